"""`ToyPolicyModule`: a tiny policy-like regression model that can be made to diverge on purpose.

It stands in for a PPO module where a real one would be too slow for tests and demos: an MLP with
Dropout (so RNG matters), Adam and a per-step StepLR (so scheduler state matters), an RL-style
piece of state carried through ``on_save_checkpoint``/``on_load_checkpoint`` (a KL coefficient),
and per-step ``train/loss``, ``train/reward`` and ``train/kl``. An optional injected divergence
multiplies the loss (and the learning rate) at a chosen step, the way a bad batch would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclasses.dataclass
class DivergenceSpec:
    """An injected divergence.

    Attributes:
        at_step: ``global_step`` during whose training step it happens (once).
        loss_scale: Factor applied to the reported and optimised loss.
        kl: KL value reported on that step (None: the normal value).
        reward_scale: Factor applied to the reported reward.
        nan: Report a NaN loss instead.
        persistent: Diverge at every step from ``at_step`` on (a run that rollbacks cannot
            save, which exercises the rollback budget), not just once.
    """

    at_step: int
    loss_scale: float = 10.0
    kl: float | None = None
    reward_scale: float = 1.0
    nan: bool = False
    persistent: bool = False


class ToyPolicyModule(pl.LightningModule):
    """MLP regression with RL-style logging and an optional injected divergence.

    Args:
        in_features: Input width.
        hidden: Hidden width.
        lr: Adam learning rate.
        dropout: Dropout probability (makes the RNG part of the training state).
        scheduler_step: StepLR period in optimizer steps.
        divergence: Optional `DivergenceSpec`.
    """

    def __init__(
        self,
        in_features: int = 8,
        hidden: int = 32,
        lr: float = 1e-2,
        dropout: float = 0.1,
        scheduler_step: int = 10,
        divergence: DivergenceSpec | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["divergence"])
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )
        self.divergence = divergence
        self.diverged_at: list[int] = []
        self.kl_coef = 0.2  # RL state that must survive a rollback, like PPO's adaptive KL β
        self.seen_steps: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _diverging(self) -> DivergenceSpec | None:
        spec = self.divergence
        step = self.trainer.global_step
        if spec is None:
            return None
        if spec.persistent:
            return spec if step >= spec.at_step else None
        if self.diverged_at or step != spec.at_step:
            return None
        return spec

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        reward = 1.0 / (1.0 + loss.detach())  # a reward that falls when the loss rises
        kl = torch.tensor(0.001) * (1.0 + loss.detach())
        spec = self._diverging()
        if spec is not None:
            self.diverged_at.append(self.trainer.global_step)
            loss = loss * spec.loss_scale
            reward = reward * spec.reward_scale
            if spec.kl is not None:
                kl = torch.tensor(spec.kl)
            if spec.nan:
                loss = loss * torch.tensor(float("nan"))
        self.seen_steps.append(self.trainer.global_step)
        self.kl_coef *= 1.01
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        self.log("train/reward", reward, on_step=True, on_epoch=False)
        self.log("train/kl", kl, on_step=True, on_epoch=False)
        return {"loss": loss, "train/reward": reward, "train/kl": kl}

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=self.hparams["scheduler_step"], gamma=0.5
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["toy_rl_state"] = {"kl_coef": self.kl_coef}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("toy_rl_state")
        if state is not None:
            self.kl_coef = float(state["kl_coef"])


def toy_dataloader(
    n: int = 2048,
    in_features: int = 8,
    batch_size: int = 128,
    seed: int = 0,
    shuffle: bool = False,
    noise: float = 0.5,
) -> DataLoader:
    """A deterministic regression data set (``y = 0.1 * sum(x) + noise``) in a DataLoader.

    The noise keeps the loss near ``noise**2`` instead of decaying to zero, and batches of 128
    keep the batch-to-batch spread small (std ~ 12 % of the loss), so a healthy run stays well
    under the guide's 2x trigger.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=generator)
    y = 0.1 * x.sum(dim=1, keepdim=True) + noise * torch.randn(n, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, num_workers=0)
