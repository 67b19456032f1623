"""Two-rank DDP run (gloo, CPU) in which only rank 1 sees a KL spike; started by
`test_ddp_rollback.py` through `subprocess`.

Lightning's DDP launcher re-runs the command that started rank 0 (`sys.argv`) for the other
ranks, so this must be a plain script, never pytest itself.

Usage: `python ddp_rollback_script.py CHECKPOINT_DIR OUT_DIR`

Each rank writes `OUT_DIR/rank{r}.json` (rollback events and steps) plus
`OUT_DIR/rank{r}_after_rollback{i}.pt` (its weights right after rollback i, taken at the start of
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
# {global_step of the training step that sees a KL spike: the only rank that sees it}. The
# callback judges it one step later. The first spike (judged at step 8) rolls back to the save
# of step 6 (known-good: the reading of step 7 was healthy), from each rank's in-memory
# snapshot; the second is the first reading after that restore, so step 6 is proven damaged and
# the rollback escalates to the older save of step 3, which no rank holds in memory: rank 0
# flushes its writer, all ranks meet at a barrier and load the file rank 0 wrote.
SPIKES = {7: 1, 8: 0}
MAX_STEPS = 12


class OneRankSpikeModule(pl.LightningModule):
    """A tiny regression MLP whose KL reading spikes at the steps of `SPIKES`, each time on
    one rank only.

    Loss and reward stay tame, and the loss/reward triggers are switched off in `main`, so the
    only thing that can cause a rollback is the one rank-local KL value: the test then shows that
    the decision is reduced across ranks, not taken per rank.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.spiked_at: list[int] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        step = self.trainer.global_step
        spike = SPIKES.get(step) == self.global_rank and step not in self.spiked_at
        if spike:
            self.spiked_at.append(step)
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
    """Records each rank's weights at the first batch start after each rollback.

    Checkpoint callbacks run last in every hook, so the rollback (in `on_train_batch_end`) has
    happened by the time the next `on_train_batch_start` runs.
    """

    def __init__(self, guard: RollbackCheckpoint) -> None:
        self.guard = guard
        self.seen_rollbacks = 0
        self.after_rollback: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        count = self.guard.rollback_count
        if count > self.seen_rollbacks:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.after_rollback.append(state)
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
    for index, state in enumerate(probe.after_rollback):
        torch.save(state, out / f"rank{rank}_after_rollback{index}.pt")
    report = {
        "rank": rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "rollback_count": guard.rollback_count,
        "rollback_events": [
            {k: v for k, v in event.items() if isinstance(v, (str, int, float, bool))}
            for event in guard.rollback_events
        ],
        "spiked_at": model.spiked_at,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
