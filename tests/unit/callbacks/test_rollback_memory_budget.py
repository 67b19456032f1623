"""`RollbackCheckpoint(host_memory_budget=...)`: below one copy of the training state a Trainer
run saves synchronously, keeps no snapshot, says why once, and still rolls back (from the
file)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.examples import DivergenceSpec, ToyPolicyModule, toy_dataloader


def test_a_budget_below_one_copy_saves_synchronously_and_rolls_back_from_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=4, host_memory_budget=1)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=6, kl=0.5, loss_scale=1.0))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=10,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with caplog.at_level(logging.WARNING, logger="lightning_fragrance.checkpointing"):
        trainer.fit(module, toy_dataloader())

    moves = [(e["at_step"], e["to_step"], e["from_memory"]) for e in guard.rollback_events]
    assert moves == [(7, 4, False)]
    warnings = [r.getMessage() for r in caplog.records if "below one copy" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert guard.engine is not None and guard.engine.snapshot is None
    steps = [r.step for r in guard.history]
    assert steps[:2] == [0, 4] and 8 in steps
    restored = torch.load(tmp_path / "checkpoint_step_4.ckpt", weights_only=True)
    assert restored["global_step"] == 4
