"""GRPO under the rollback guard: the logged metrics, the pieces of the loss, and a rollback."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_fragrance.callbacks import FaultInjection, RollbackCheckpoint
from lightning_fragrance.llm.grpo import BriefGRPO, completion_mask, group_advantages

LOGGED = ("train/kl", "train/ref_kl", "train/loss", "train/reward")


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _trainer(tmp_path: Path, steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        # The guard is a Checkpoint callback; without it no checkpoint is written at all.
        enable_checkpointing=any(isinstance(c, RollbackCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )


def _module(sft_dir: Path, **overrides: float) -> BriefGRPO:
    settings = {"n_prompts": 32, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 16}
    return BriefGRPO(sft_dir=str(sft_dir), **{**settings, **overrides})  # type: ignore[arg-type]


def test_group_advantages_are_zero_when_a_group_scored_alike() -> None:
    advantages = group_advantages(torch.tensor([0.5, 0.5, 0.2, 0.8]), group_size=2)
    assert advantages[:2].abs().max() == 0
    assert advantages[2] < 0 < advantages[3]


def test_completion_mask_keeps_the_end_token_and_drops_what_follows() -> None:
    mask = completion_mask(torch.tensor([[5, 6, 3, 0, 0], [5, 5, 5, 5, 5]]), eos_id=3)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_every_update_logs_kl_ref_kl_loss_and_reward(tiny_sft_dir: Path, tmp_path: Path) -> None:
    recorder = _Recorder()
    module = _module(tiny_sft_dir)
    _trainer(tmp_path, 3, [recorder]).fit(module)
    assert len(recorder.rows) == 3
    for row in recorder.rows:
        assert all(key in row for key in LOGGED)
        assert row["train/kl"] >= 0 and row["train/ref_kl"] >= -1e-6
        assert 0.0 <= row["train/reward"] <= 1.0
        # Advantages sum to zero in each group: the surrogate's value is 0, the loss is the
        # KL and SFT terms (what the guard's loss trigger should watch).
        assert row["train/pg_loss"] == pytest.approx(0.0, abs=1e-5)
    # The first update starts at the reference: nothing has moved yet.
    assert recorder.rows[0]["train/ref_kl"] == pytest.approx(0.0, abs=1e-5)


def test_the_reference_model_stays_frozen(tiny_sft_dir: Path, tmp_path: Path) -> None:
    module = _module(tiny_sft_dir, learning_rate=1e-3)
    before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    _trainer(tmp_path, 2, []).fit(module)
    after = module.reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(
        module.policy.state_dict()["model.embed_tokens.weight"],
        before["model.embed_tokens.weight"],
    )


def test_an_lr_spike_trips_the_guards_kl_threshold_and_rolls_back(
    tiny_sft_dir: Path, tmp_path: Path
) -> None:
    guard = RollbackCheckpoint(
        dirpath=str(tmp_path / "ckpt"),
        save_every_n_steps=2,
        kl_threshold=0.03,
        loss_increase_multiplier=2.0,
        reward_drop_threshold=0.3,
        async_save=False,
    )
    fault = FaultInjection(kind="lr_spike", at_step=4, lr_factor=1000.0)
    module = _module(tiny_sft_dir, learning_rate=1e-4)
    _trainer(tmp_path, 7, [fault, guard]).fit(module)
    guard.flush()
    assert fault.events and fault.events[0]["step"] == 4
    assert guard.rollback_events, "the LR spike should have been rolled back"
    assert guard.rollback_events[0]["to_step"] <= 4
