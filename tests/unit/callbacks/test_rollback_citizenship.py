"""RollbackCheckpoint as a Lightning citizen: ``ckpt_path="best"`` after the fit, other
checkpoint callbacks, ``fast_dev_run``, per-run default directories, two guards, someone
else's directory, a directory the run cannot write. Real `Trainer.fit` runs on CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.checkpointing import CheckpointDirectoryError
from lightning_fragrance.examples import ToyPolicyModule, toy_dataloader


class TestableToy(ToyPolicyModule):
    """The toy module with a test loop (`trainer.test()` needs one)."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.log("test/loss", torch.nn.functional.mse_loss(self(x), y))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.log("val/loss", torch.nn.functional.mse_loss(self(x), y))

    def test_dataloader(self) -> Any:
        return toy_dataloader()


def trainer_for(callbacks: list[pl.Callback], root: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=kwargs.pop("max_steps", 8),
        callbacks=callbacks,
        logger=kwargs.pop("logger", False),
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def fit(trainer: pl.Trainer, module: pl.LightningModule | None = None) -> pl.LightningModule:
    pl.seed_everything(7, verbose=False)
    module = module or TestableToy()
    trainer.fit(module, toy_dataloader())
    return module


def test_test_after_a_guarded_fit_loads_the_newest_known_good_checkpoint(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path / "ckpt", save_every_n_steps=3)
    trainer = trainer_for([guard], tmp_path)
    fit(trainer)
    trainer.test(verbose=False)  # ckpt_path=None after fit means "best"
    assert guard.best_model_path.endswith("checkpoint_step_6.ckpt")
    assert trainer.ckpt_path == guard.best_model_path
    trainer.validate(ckpt_path="best", verbose=False, dataloaders=toy_dataloader())


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "user-first"])
def test_best_is_the_users_model_checkpoint_whatever_the_callback_order(
    tmp_path: Path, guard_first: bool
) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path / "guard", save_every_n_steps=3)
    user = ModelCheckpoint(dirpath=tmp_path / "user", monitor="train/loss", mode="min")
    callbacks: list[pl.Callback] = [guard, user] if guard_first else [user, guard]
    trainer = trainer_for(callbacks, tmp_path)
    fit(trainer)
    trainer.test(ckpt_path="best", verbose=False)
    assert user.best_model_path and trainer.ckpt_path == user.best_model_path


def test_lightning_writes_no_checkpoint_of_its_own_beside_the_guard(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path / "ckpt", save_every_n_steps=3)
    fit(trainer_for([guard], tmp_path, logger=CSVLogger(tmp_path)))
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*.ckpt")}
    assert all(p.parts[0] == "ckpt" for p in written), written


def test_fast_dev_run_writes_nothing(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path / "ckpt", save_every_n_steps=1)
    fit(trainer_for([guard], tmp_path, fast_dev_run=True, max_steps=-1))
    assert not (tmp_path / "ckpt").exists()
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_default_directory_is_per_run_so_a_second_run_in_one_folder_just_works(
    tmp_path: Path,
) -> None:
    first, second = (
        RollbackCheckpoint(save_every_n_steps=3),
        RollbackCheckpoint(save_every_n_steps=3),
    )
    fit(trainer_for([first], tmp_path))
    fit(trainer_for([second], tmp_path))
    assert first.store.directory == str(tmp_path / "checkpoints" / "version_0")
    assert second.store.directory == str(tmp_path / "checkpoints" / "version_1")
    versioned = RollbackCheckpoint(save_every_n_steps=3)
    trainer = trainer_for([versioned], tmp_path, logger=CSVLogger(tmp_path / "logs"))
    fit(trainer)
    assert versioned.store.directory == os.path.join(str(trainer.log_dir), "checkpoints")


def test_a_resumed_fit_continues_in_the_directory_of_its_checkpoint(tmp_path: Path) -> None:
    first = RollbackCheckpoint(save_every_n_steps=3)
    fit(trainer_for([first], tmp_path, max_steps=6))
    resumed = RollbackCheckpoint(save_every_n_steps=3)
    trainer = trainer_for([resumed], tmp_path, max_steps=9)
    trainer.fit(TestableToy(), toy_dataloader(), ckpt_path=first.best_model_path)
    assert resumed.store.directory == first.store.directory
    assert resumed.guard.run_id == first.guard.run_id
    assert [r.step for r in resumed.history] == [0, 3, 6, 9]


def test_two_guards_keep_their_own_state_in_one_checkpoint(tmp_path: Path) -> None:
    a = RollbackCheckpoint(dirpath=tmp_path / "a", save_every_n_steps=3)
    b = RollbackCheckpoint(dirpath=tmp_path / "b", save_every_n_steps=4, kl_key="train/kl2")
    fit(trainer_for([a, b], tmp_path))
    assert a.state_key != b.state_key
    checkpoint = torch.load(tmp_path / "a" / "checkpoint_step_6.ckpt", weights_only=True)
    assert {a.state_key, b.state_key} <= set(checkpoint["callbacks"])


def test_a_directory_holding_another_runs_checkpoints_is_refused_with_the_ways_out(
    tmp_path: Path,
) -> None:
    fit(
        trainer_for([RollbackCheckpoint(dirpath=tmp_path / "ckpt", save_every_n_steps=3)], tmp_path)
    )
    before = json.loads((tmp_path / "ckpt" / "checkpoint_history.json").read_text())
    stranger = RollbackCheckpoint(dirpath=tmp_path / "ckpt", save_every_n_steps=3)
    with pytest.raises(CheckpointDirectoryError) as caught:
        fit(trainer_for([stranger], tmp_path))
    message = str(caught.value)
    assert "RollbackCheckpoint" in message and "another run" in message
    assert "ckpt_path=" in message and "overwrite=True" in message and "dirpath=None" in message
    after = json.loads((tmp_path / "ckpt" / "checkpoint_history.json").read_text())
    assert after == before  # nothing merged, nothing deleted

    fresh = RollbackCheckpoint(dirpath=tmp_path / "ckpt", save_every_n_steps=3, overwrite=True)
    fit(trainer_for([fresh], tmp_path, max_steps=4))
    now = json.loads((tmp_path / "ckpt" / "checkpoint_history.json").read_text())
    assert now["run_id"] == fresh.guard.run_id != before["run_id"]
    assert {e["run_id"] for e in now["entries"]} == {fresh.guard.run_id}
    [kept] = (tmp_path / "ckpt").glob(f"checkpoint_history.{before['run_id']}.*.json")
    assert json.loads(kept.read_text())["entries"] == before["entries"]


def test_a_directory_the_run_cannot_write_fails_at_setup_naming_the_callback_and_path(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoint directory's parent should be")
    guard = RollbackCheckpoint(dirpath=blocker / "ckpt", save_every_n_steps=3)
    trainer = trainer_for([guard], tmp_path)
    with pytest.raises(CheckpointDirectoryError, match=r"RollbackCheckpoint: cannot write .*ckpt"):
        fit(trainer)
    assert trainer.global_step == 0
