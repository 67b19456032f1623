"""RollbackCheckpoint when the evidence arrives late: metrics logged once per epoch (one value
per rollout, as most RL examples do) and faults landing anywhere around the saves.

Real `Trainer.fit` runs on CPU. The module logs loss, reward and KL with ``on_epoch=True``
only; a fault adds a large offset to the weights once, at the training step of a chosen
``global_step`` (its reward is the first bad value), and is not repeated after a restore.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fragrance.callbacks import RollbackCheckpoint

STEPS_PER_EPOCH = 4
SAVE_EVERY = 5


class EpochLoggedPolicy(pl.LightningModule):
    """A PPO-shaped toy: the "reward" of a batch is 10 minus the distance of the weights to a
    target, and every metric is logged once per epoch."""

    def __init__(self, fault_at: int | None = None) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.full((8,), 0.5))
        self.fault_at = fault_at
        self.faulted = False  # plain attribute: a restore does not bring the fault back

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fault_at is not None and not self.faulted and self.global_step == self.fault_at:
            self.faulted = True
            with torch.no_grad():
                self.weights.add_(30.0)
        (target,) = batch
        distance = (self.weights - target.mean(0)).pow(2).mean()
        before = self.weights.detach().clone()
        self._before = before
        loss = distance + 1.0  # an offset: the magnitude stays ~1, far from the ratio floor
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True)
        self.log("train/reward", 10.0 - distance.detach(), on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        kl = (self.weights.detach() - self._before).pow(2).sum()
        self.log("train/kl", kl, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def run(tmp_path: Path, fault_at: int | None, max_steps: int = 32) -> RollbackCheckpoint:
    pl.seed_everything(3, verbose=False)
    guard = RollbackCheckpoint(
        dirpath=tmp_path / "checkpoints", save_every_n_steps=SAVE_EVERY, max_checkpoints=10
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = TensorDataset(torch.zeros(STEPS_PER_EPOCH, 8))
    trainer.fit(EpochLoggedPolicy(fault_at), DataLoader(data, batch_size=1))
    assert trainer.global_step == max_steps  # no budget abort, no crash
    return guard


def expected_target(fault_at: int) -> int:
    """The newest save before the fault with healthy fresh evidence: an epoch that began at or
    after the save and ended before the faulty training step."""
    saves = [s for s in range(0, fault_at + 1, SAVE_EVERY)]
    epochs = [
        (k * STEPS_PER_EPOCH, (k + 1) * STEPS_PER_EPOCH - 1)
        for k in range(fault_at // STEPS_PER_EPOCH + 1)
    ]
    good = [s for s in saves if any(start >= s and last < fault_at for start, last in epochs)]
    return max(good, default=0)


@pytest.mark.parametrize(
    "fault_at",
    [14, 17, 9, 4],
    ids=[
        "just-before-a-save",
        "between-a-save-and-its-evidence",
        "on-a-save-step",
        "before-any-save",
    ],
)
def test_a_fault_seen_only_at_the_epoch_end_rolls_back_once_to_a_known_good_state(
    tmp_path: Path, fault_at: int, caplog: pytest.LogCaptureFixture
) -> None:
    # before-any-save: the fault lands after the first epoch's healthy evidence and before the
    # first periodic save (step 5, which then holds it): the state the fit began from is the
    # target. (A fault inside the very first epoch has no earlier value to be compared with:
    # only the non-finite and absolute KL rules can see it; docs/checkpointing.md says so.)
    caplog.set_level(logging.INFO, logger="lightning_fragrance")
    guard = run(tmp_path, fault_at)
    [event] = guard.rollback_events  # one rollback per fault: the stale value never re-fires
    assert event["to_step"] == expected_target(fault_at)
    detected = (fault_at // STEPS_PER_EPOCH + 1) * STEPS_PER_EPOCH
    assert event["at_step"] == detected
    history = json.loads((tmp_path / "checkpoints" / "checkpoint_history.json").read_text())
    statuses = {e["step"]: e["status"] for e in history["entries"]}
    damaged = [s for s in statuses if fault_at < s <= detected]
    assert all(statuses[s] == "rejected" for s in damaged)  # never a target
    unproven = [s for s in statuses if event["to_step"] < s <= fault_at]
    assert all(statuses[s] == "rejected" for s in unproven)
    assert statuses[event["to_step"]] == "certified"
    assert any(e["status"] == "certified" and e["step"] > detected for e in history["entries"])
    messages = [r.getMessage() for r in caplog.records]
    assert not any("was not produced" in m for m in messages)  # on_epoch is not "missing"
    assert any("'train/reward' (reward) is logged on_epoch" in m for m in messages)


def test_a_clean_epoch_logged_run_never_rolls_back_and_certifies_its_checkpoints(
    tmp_path: Path,
) -> None:
    guard = run(tmp_path, fault_at=None)
    assert guard.rollback_count == 0
    statuses = {r.step: r.status for r in guard.history}
    assert statuses[0] == "certified" and statuses[25] == "certified"
    assert "rejected" not in statuses.values()


class ValidatedPolicy(EpochLoggedPolicy):
    """The reward is measured by a validation run (every 4 steps), not by training."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fault_at is not None and not self.faulted and self.global_step == self.fault_at:
            self.faulted = True
            with torch.no_grad():
                self.weights.add_(30.0)
        (target,) = batch
        return (self.weights - target.mean(0)).pow(2).mean() + 1.0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (target,) = batch
        distance = (self.weights - target.mean(0)).pow(2).mean()
        self.log("val/reward", 10.0 - distance)


def test_a_validation_metric_judges_the_state_it_evaluated_once(tmp_path: Path) -> None:
    pl.seed_everything(3, verbose=False)
    guard = RollbackCheckpoint(
        dirpath=tmp_path / "checkpoints",
        save_every_n_steps=SAVE_EVERY,
        reward_key="val/reward",
        loss_key="train/none",
        kl_key="train/none",
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=24,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=4,
        check_val_every_n_epoch=None,
    )
    data = DataLoader(TensorDataset(torch.zeros(STEPS_PER_EPOCH, 8)), batch_size=1)
    trainer.fit(ValidatedPolicy(fault_at=9), data, data)
    # Validation at 4 and 8 is healthy; the one at 12 sees the fault of step 9.
    [event] = guard.rollback_events
    assert event["at_step"] == 12 and event["to_step"] == 5  # 5: validated healthy at 8
    assert trainer.global_step == 24
