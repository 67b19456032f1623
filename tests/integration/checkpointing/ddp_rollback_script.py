"""Two-rank DDP run (gloo, CPU) in which only rank 1 sees a KL spike; started by
`test_ddp_rollback.py` through `subprocess`.

Lightning's DDP launcher re-runs the command that started rank 0 (`sys.argv`) for the other
ranks, so this must be a plain script, never pytest itself.

Usage: `python ddp_rollback_script.py CHECKPOINT_DIR OUT_DIR`

Each rank writes `OUT_DIR/rank{r}.json` (rollback events and steps) plus
`OUT_DIR/rank{r}_after_rollback.pt` (its weights right after the rollback, taken at the start of
the next batch) and `OUT_DIR/rank{r}_final.pt` (its weights when the fit ended). The test compares
them with each other and with the checkpoint file the ranks rolled back to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fragrance.callbacks import RollbackCheckpoint

SAVE_EVERY = 3
# The spike is injected in the training step that runs while global_step == SPIKE_STEP, so the
# callback sees it at global_step SPIKE_STEP + 1, one step after the save at SPIKE_STEP.
SPIKE_STEP = 6
SPIKE_RANK = 1
MAX_STEPS = 10


class OneRankSpikeModule(pl.LightningModule):
    """A tiny regression MLP whose KL reading spikes once, on one rank only.

    Loss and reward stay tame, and the loss/reward triggers are switched off in `main`, so the
    only thing that can cause a rollback is the one rank-local KL value: the test then shows that
    the decision is reduced across ranks, not taken per rank.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.spiked = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        spike = (
            not self.spiked
            and self.global_rank == SPIKE_RANK
            and self.trainer.global_step == SPIKE_STEP
        )
        if spike:
            self.spiked = True
        kl = torch.tensor(1.0 if spike else 0.001)
        reward = torch.tensor(1.0)
        # sync_dist=False on purpose: each rank logs what it saw, as a rank-local trigger would.
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        self.log("train/reward", reward, on_step=True, on_epoch=False)
        self.log("train/kl", kl, on_step=True, on_epoch=False)
        return {"loss": loss, "train/kl": kl, "train/reward": reward}

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


class RollbackProbe(pl.Callback):
    """Records each rank's weights at the first batch start after a rollback.

    Checkpoint callbacks run last in every hook, so the rollback (in `on_train_batch_end`) has
    happened by the time the next `on_train_batch_start` runs.
    """

    def __init__(self, guard: RollbackCheckpoint) -> None:
        self.guard = guard
        self.seen_rollbacks = 0
        self.after_rollback: dict[str, torch.Tensor] | None = None
        self.after_rollback_step: int | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        count = self.guard.rollback_count
        if count > self.seen_rollbacks and self.after_rollback is None:
            self.after_rollback = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.after_rollback_step = trainer.global_step
        self.seen_rollbacks = count


def main(checkpoint_dir: str, out_dir: str) -> None:
    pl.seed_everything(1234, workers=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True) * 0.1
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)

    guard = RollbackCheckpoint(
        dirpath=checkpoint_dir,
        save_every_n_steps=SAVE_EVERY,
        max_checkpoints=5,
        kl_threshold=0.03,
        loss_increase_multiplier=1e9,
        reward_drop_threshold=1e9,
    )
    probe = RollbackProbe(guard)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=MAX_STEPS,
        callbacks=[probe, guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = OneRankSpikeModule()
    trainer.fit(model, loader)

    rank = trainer.global_rank
    out = Path(out_dir)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(final, out / f"rank{rank}_final.pt")
    if probe.after_rollback is not None:
        torch.save(probe.after_rollback, out / f"rank{rank}_after_rollback.pt")
    report = {
        "rank": rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "rollback_count": guard.rollback_count,
        "rollback_events": [
            {k: v for k, v in event.items() if isinstance(v, (str, int, float, bool))}
            for event in guard.rollback_events
        ],
        "after_rollback_step": probe.after_rollback_step,
        "saw_spike": model.spiked,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
