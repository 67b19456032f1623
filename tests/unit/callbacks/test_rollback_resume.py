"""RollbackCheckpoint files: resume with `Trainer.fit(ckpt_path=...)`, weights_only loading,
fsspec URLs, and corrupt files met during a rollback."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import lightning.pytorch as pl
import pytest
import torch

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.checkpointing import NoGoodCheckpointError
from lightning_fragrance.examples import DivergenceSpec, ToyPolicyModule, toy_dataloader


def trainer_for(callbacks: list[pl.Callback], max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def test_resume_restores_history_counters_and_budget(tmp_path: Path) -> None:
    first = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=5, max_rollbacks=2)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=7, loss_scale=100.0))
    trainer_for([first], max_steps=12).fit(module, toy_dataloader())
    assert first.rollback_count == 1

    resumed = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=5, max_rollbacks=2)
    trainer = trainer_for([resumed], max_steps=16)
    trainer.fit(ToyPolicyModule(), toy_dataloader(), ckpt_path=tmp_path / "checkpoint_step_10.ckpt")
    assert trainer.global_step == 16
    assert resumed.rollback_count == 1
    assert resumed.rollback_events == first.rollback_events
    assert resumed.guard.rollbacks_in_window(16) == 1  # the budget remembers
    assert [r.step for r in resumed.history] == [0, 5, 10, 15]  # 0: where the first fit began
    history = json.loads((tmp_path / "checkpoint_history.json").read_text())
    assert [e["at_step"] for e in history["events"]] == [8]
    # Every file written is a standard Lightning checkpoint that loads with weights_only=True,
    # and the file carries its own history entry (appended before the dump).
    for path in sorted(tmp_path.glob("*.ckpt")):
        ckpt = torch.load(path, weights_only=True)
        [key] = [k for k in ckpt["callbacks"] if k.startswith("RollbackCheckpoint")]
        ledger = ckpt["callbacks"][key]["guard"]["ledger"]
        assert ledger[-1]["step"] == ckpt["global_step"]


def test_fsspec_memory_url_saves_rolls_back_from_file_and_resumes() -> None:
    url = f"memory://lf-{uuid.uuid4().hex}/checkpoints"
    guard = RollbackCheckpoint(dirpath=url, save_every_n_steps=4, keep_in_memory=False)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=6, kl=0.5, loss_scale=1.0))
    trainer_for([guard], max_steps=10).fit(module, toy_dataloader())
    assert [(e["at_step"], e["to_step"], e["from_memory"]) for e in guard.rollback_events] == [
        (7, 4, False)
    ]
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    assert fs.exists(f"{root}/checkpoint_history.json")
    resumed = RollbackCheckpoint(dirpath=url, save_every_n_steps=4)
    trainer = trainer_for([resumed], max_steps=12)
    trainer.fit(ToyPolicyModule(), toy_dataloader(), ckpt_path=f"{url}/checkpoint_step_8.ckpt")
    assert resumed.rollback_count == 1 and trainer.global_step == 12


class CorruptBeforeRollback(pl.Callback):
    """Damages checkpoint files on disk just before the step whose end triggers a rollback."""

    def __init__(self, guard: RollbackCheckpoint, at_step: int, steps: list[int]) -> None:
        self.guard, self.at_step, self.steps = guard, at_step, steps

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.at_step:
            return
        self.guard.flush()
        for step in self.steps:
            path = Path(self.guard.store.directory) / f"checkpoint_step_{step}.ckpt"
            data = bytearray(path.read_bytes())
            data[len(data) // 3] ^= 0x10
            path.write_bytes(bytes(data))


def test_bit_flipped_newest_checkpoint_falls_back_to_the_next_older(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=3, keep_in_memory=False)
    damage = CorruptBeforeRollback(guard, at_step=7, steps=[6])
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=7, kl=0.5, loss_scale=1.0))
    trainer_for([damage, guard], max_steps=10).fit(module, toy_dataloader())
    assert [(e["at_step"], e["to_step"]) for e in guard.rollback_events] == [(8, 3)]
    history = json.loads((tmp_path / "checkpoint_history.json").read_text())
    assert {e["step"]: e["status"] for e in history["entries"]}[6] == "corrupt"


def test_no_intact_checkpoint_left_stops_the_fit_with_a_clear_error(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=3, keep_in_memory=False)
    damage = CorruptBeforeRollback(guard, at_step=7, steps=[0, 3, 6])
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=7, kl=0.5, loss_scale=1.0))
    with pytest.raises(NoGoodCheckpointError, match=r"step_6\.ckpt.*step_3\.ckpt.*step_0\.ckpt"):
        trainer_for([damage, guard], max_steps=10).fit(module, toy_dataloader())
