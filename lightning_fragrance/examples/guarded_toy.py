"""A short guarded training run whose log shows save → trigger → rollback → recovery.

    python -m lightning_fragrance.examples.guarded_toy [--dir DIR] [--steps 60] [--diverge-at 33]

It trains `ToyPolicyModule` with `RollbackCheckpoint`, injects a divergence (the loss and the
update blow up 50x on one step), and prints where the checkpoints and their history are.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.cli.checkpoints import cmd_list
from lightning_fragrance.examples.toy import DivergenceSpec, ToyPolicyModule, toy_dataloader

log = logging.getLogger("lightning_fragrance.examples.guarded_toy")


class RecoveryReport(pl.Callback):
    """Logs the loss now and then, and once, the first healthy step after each rollback."""

    def __init__(self, guard: RollbackCheckpoint, every: int) -> None:
        self.guard = guard
        self.every = every
        self._seen_rollbacks = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        loss = float(trainer.callback_metrics.get("train/loss", math.nan))
        if self.guard.rollback_count > self._seen_rollbacks:
            self._seen_rollbacks = self.guard.rollback_count
            event = self.guard.rollback_events[-1]
            log.info(
                "Recovery: step=%d trains from the state of step=%d again (loss %.4f this step)",
                step,
                event["to_step"],
                loss,
            )
        elif step % self.every == 0:
            log.info("step=%d loss=%.4f", step, loss)


def run(directory: Path, steps: int, save_every: int, diverge_at: int) -> RollbackCheckpoint:
    """Train with the guard and return it (for its history and events)."""
    pl.seed_everything(0, verbose=False)
    guard = RollbackCheckpoint(dirpath=directory, save_every_n_steps=save_every)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=diverge_at, loss_scale=50.0))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[RecoveryReport(guard, every=5), guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    log.info(
        "Guarded toy run: %d steps, checkpoint every %d, divergence injected at step %d",
        steps,
        save_every,
        diverge_at,
    )
    trainer.fit(module, toy_dataloader())
    return guard


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", default="outputs/guarded_toy/checkpoints", type=Path)
    parser.add_argument("--steps", default=60, type=int)
    parser.add_argument("--save-every", default=10, type=int)
    parser.add_argument("--diverge-at", default=33, type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    directory = args.dir.resolve()
    if directory.exists() and any(directory.glob("checkpoint_*")):
        log.error(
            "%s already holds checkpoints; pass --dir to an empty directory or delete it first",
            directory,
        )
        return 2
    guard = run(directory, args.steps, args.save_every, args.diverge_at)
    print()
    cmd_list(str(directory))
    print(f"\nCheckpoints: {directory}")
    print(f"History:     {guard.store.history_path}")
    print(f"Rollbacks:   {guard.rollback_count}  (inspect with: lf-checkpoints list {directory})")
    return 0 if guard.rollback_count >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
