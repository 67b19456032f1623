"""RollbackCheckpoint inside real `Trainer.fit` runs on CPU: restore fidelity, triggers,
dry run, budget, missing metrics, remedies, manual optimization."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.callbacks.rollback import RNG_KEY
from lightning_fragrance.checkpointing import (
    MissingMetricError,
    NullObserver,
    RollbackBudgetExceeded,
)
from lightning_fragrance.examples import DivergenceSpec, ToyPolicyModule, toy_dataloader


def fit(
    callbacks: list[pl.Callback],
    max_steps: int,
    module: pl.LightningModule | None = None,
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(7, verbose=False)
    module = module or ToyPolicyModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, toy_dataloader())
    return trainer, module


class AfterRollbackProbe(pl.Callback):
    """Captures the training state at the first batch start after each rollback, the batch,
    and the weights right after that batch's update. Runs before RollbackCheckpoint in every
    hook (Lightning moves Checkpoint callbacks last)."""

    def __init__(self, guard: RollbackCheckpoint) -> None:
        self.guard = guard
        self.seen = 0
        self.captured: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.guard.rollback_count > self.seen:
            self.seen = self.guard.rollback_count
            optimizer = trainer.optimizers[0]
            scheduler = trainer.lr_scheduler_configs[0].scheduler
            self._open = {
                "step": trainer.global_step,
                "weights": copy.deepcopy(pl_module.state_dict()),
                "optimizer": copy.deepcopy(optimizer.state_dict()),
                "scheduler": copy.deepcopy(scheduler.state_dict()),
                "base_lrs": list(getattr(scheduler, "base_lrs", [])),
                "rng": torch.get_rng_state(),
                "kl_coef": getattr(pl_module, "kl_coef", None),
                "batch": [t.clone() for t in batch],
                "grads": [p.grad for p in pl_module.parameters()],
                "updates": [],
            }
            self.captured.append(self._open)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._open is not None and len(self._open["updates"]) < 3:
            self._open["updates"].append(copy.deepcopy(pl_module.state_dict()))


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("keep_in_memory", [True, False], ids=["memory", "file"])
def test_rollback_restores_weights_adam_scheduler_rng_exactly_and_next_update_matches(
    tmp_path: Path, keep_in_memory: bool
) -> None:
    guard = RollbackCheckpoint(
        dirpath=tmp_path, save_every_n_steps=5, keep_in_memory=keep_in_memory
    )
    probe = AfterRollbackProbe(guard)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=7, loss_scale=100.0))
    trainer, _ = fit([probe, guard], max_steps=12, module=module)

    assert guard.rollback_count == 1
    event = guard.rollback_events[0]
    assert (event["at_step"], event["to_step"], event["reason"]) == (8, 5, "loss_spike")
    assert event["from_memory"] is keep_in_memory
    assert trainer.global_step == 12  # the step counter keeps counting through a rollback
    state = probe.captured[0]
    assert state["step"] == 8
    ckpt = load(tmp_path / "checkpoint_step_5.ckpt")

    for key, tensor in ckpt["state_dict"].items():
        assert torch.equal(state["weights"][key], tensor), key
    saved_opt, live_opt = ckpt["optimizer_states"][0], state["optimizer"]
    for index, saved in saved_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(live_opt["state"][index][name], saved[name]), (index, name)
    assert live_opt["param_groups"][0]["lr"] == saved_opt["param_groups"][0]["lr"]
    assert state["scheduler"] == ckpt["lr_schedulers"][0]
    assert torch.equal(state["rng"], ckpt[RNG_KEY]["torch"])
    assert state["kl_coef"] == ckpt["toy_rl_state"]["kl_coef"]  # module's RL state came back
    assert all(g is None for g in state["grads"])

    # A reference model, optimizer, scheduler and RNG loaded from the same file takes the same
    # batch: its update must be bit-identical to the trainer's first update after the rollback.
    reference = ToyPolicyModule()
    reference.load_state_dict(ckpt["state_dict"])
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    optimizer.load_state_dict(ckpt["optimizer_states"][0])
    torch.set_rng_state(ckpt[RNG_KEY]["torch"])
    reference.train()
    x, y = state["batch"]
    loss = nn.functional.mse_loss(reference(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(state["updates"][0][key], tensor), key


@pytest.mark.parametrize(
    "spec, reason",
    [
        (DivergenceSpec(at_step=6, loss_scale=1.0, kl=0.5), "kl_spike"),
        (DivergenceSpec(at_step=6, loss_scale=1.0, reward_scale=0.2), "reward_drop"),
        (DivergenceSpec(at_step=6, nan=True), "non_finite"),
    ],
    ids=["kl", "reward", "nan"],
)
def test_each_trigger_rolls_back_a_real_fit(
    tmp_path: Path, spec: DivergenceSpec, reason: str
) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=4)
    _, module = fit([guard], max_steps=10, module=ToyPolicyModule(divergence=spec))
    assert [(e["at_step"], e["to_step"], e["reason"]) for e in guard.rollback_events] == [
        (7, 4, reason)
    ]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    history = json.loads((tmp_path / "checkpoint_history.json").read_text())
    assert [e["reason"] for e in history["events"]] == [reason]


def test_healthy_run_never_triggers_and_saves_on_schedule(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=4, max_checkpoints=2)
    fit([guard], max_steps=13)
    assert guard.rollback_count == 0
    assert [r.step for r in guard.history] == [8, 12]
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [
        "checkpoint_step_12.ckpt",
        "checkpoint_step_8.ckpt",
    ]


def test_dry_run_records_the_trigger_and_restores_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lightning_fragrance")
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=4, dry_run=True)
    probe = AfterRollbackProbe(guard)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=6, kl=0.9, loss_scale=1.0))
    fit([probe, guard], max_steps=10, module=module)
    assert guard.rollback_count == 0 and probe.captured == []
    [event] = guard.events
    assert (event["type"], event["at_step"], event["to_step"]) == ("dry_run_trigger", 7, 4)
    history = json.loads((tmp_path / "checkpoint_history.json").read_text())
    assert history["events"][0]["type"] == "dry_run_trigger"
    assert any("dry run, nothing restored" in r.getMessage() for r in caplog.records)


def test_rollback_budget_stops_the_fit_naming_the_last_good_checkpoint(tmp_path: Path) -> None:
    # From step 5 on every step diverges: rollbacks cannot fix it, the budget ends the fit.
    # Restored to 4, the fault came back (4 is rejected), escalated to 2, back again (2 is
    # rejected): the last state proven good is the one the fit started from.
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=2, max_rollbacks=2)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=5, kl=0.5, persistent=True))
    with pytest.raises(RollbackBudgetExceeded, match=r"step=0 \(checkpoint_step_0\.ckpt\)"):
        fit([guard], max_steps=20, module=module)
    assert guard.rollback_count == 2
    assert [(e["at_step"], e["to_step"]) for e in guard.rollback_events] == [(6, 4), (7, 2)]
    history = json.loads((tmp_path / "checkpoint_history.json").read_text())
    assert [e["type"] for e in history["events"]] == ["rollback", "rollback", "budget_exceeded"]


def test_missing_metric_warns_once_naming_the_key_and_the_logged_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lightning_fragrance")
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=4, reward_key="train/rew")
    fit([guard], max_steps=6)
    warnings = [r.getMessage() for r in caplog.records if "train/rew" in r.getMessage()]
    assert len(warnings) == 1
    assert "'train/reward'" in warnings[0] and "strict=True" in warnings[0]


def test_missing_metric_with_strict_raises(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path, kl_key="train/approx_kl", strict=True)
    with pytest.raises(MissingMetricError, match="train/approx_kl"):
        fit([guard], max_steps=3)


def test_remedies_scale_lr_reseed_and_skip_the_next_updates(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(
        dirpath=tmp_path, save_every_n_steps=5, lr_factor=0.5, reseed=True, skip_batches=2
    )
    probe = AfterRollbackProbe(guard)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=7, loss_scale=100.0))
    trainer, _ = fit([probe, guard], max_steps=14, module=module)
    ckpt = load(tmp_path / "checkpoint_step_5.ckpt")
    state = probe.captured[0]
    saved_lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(saved_lr * 0.5)
    assert state["base_lrs"] == [pytest.approx(1e-2 * 0.5)]
    assert not torch.equal(state["rng"], ckpt[RNG_KEY]["torch"])
    first, second, third = state["updates"]
    # Two skipped updates: weights stay at the restored state; the third step learns again.
    assert all(torch.equal(first[k], state["weights"][k]) for k in first)
    assert all(torch.equal(second[k], state["weights"][k]) for k in second)
    assert not all(torch.equal(third[k], state["weights"][k]) for k in third)
    assert trainer.global_step == 14  # skipping did not end the epoch or the fit
    assert guard.rollback_events[0]["skip_batches"] == 2


class ManualPPOLike(ToyPolicyModule):
    """Manual optimization with three optimizer steps per batch, like PPO epochs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        optimizer = self.optimizers()
        assert isinstance(optimizer, pl.core.optimizer.LightningOptimizer)
        kl = torch.tensor(0.001)
        for _ in range(3):
            loss = nn.functional.mse_loss(self(batch[0]), batch[1])
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        if self.divergence is not None and self.trainer.global_step == self.divergence.at_step:
            kl = torch.tensor(0.5)
        return {
            "loss": loss.detach(),
            "train/loss": loss.detach(),
            "train/reward": 1.0,
            "train/kl": kl,
        }


def test_manual_optimization_saves_at_or_past_each_multiple_and_rolls_back(
    tmp_path: Path,
) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=5, max_checkpoints=10)
    module = ManualPPOLike(divergence=DivergenceSpec(at_step=18))
    fit([guard], max_steps=30, module=module)
    # Step 0 is the state the fit started from (the last-resort target).
    assert [r.step for r in guard.history] == [0, 6, 12, 15, 21, 27, 30]
    # The first evidence after the save at 15 is the faulty update's: 15 is not a target.
    assert [(e["at_step"], e["to_step"]) for e in guard.rollback_events] == [(18, 12)]


def test_gradient_accumulation_judges_the_worst_micro_batch_once_per_step(tmp_path: Path) -> None:
    # The spike is in the first micro-batch of step 5; the step's second micro-batch is healthy.
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=3)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=4, kl=0.5, loss_scale=1.0))
    trainer, _ = fit([guard], max_steps=6, module=module, accumulate_grad_batches=2)
    assert trainer.global_step == 6
    assert [(e["at_step"], e["to_step"]) for e in guard.rollback_events] == [(5, 3)]


def test_gradient_norm_is_measured_when_not_logged(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(
        dirpath=tmp_path,
        save_every_n_steps=3,
        grad_norm_threshold=20.0,
        baseline="window_median",
        window=3,
        loss_increase_multiplier=1e9,
        reward_drop_threshold=1e9,
    )
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=7, loss_scale=1000.0))
    fit([guard], max_steps=10, module=module)
    assert [(e["at_step"], e["reason"]) for e in guard.rollback_events] == [(8, "grad_norm_spike")]


class ScalerShock(pl.Callback):
    """Changes the GradScaler's scale after the save, as an overflow would."""

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == 6:
            trainer.precision_plugin.scaler.update(new_scale=8.0)  # type: ignore[attr-defined]


def test_rollback_restores_the_grad_scaler_of_mixed_precision(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    # On CPU "16-mixed" silently becomes bf16 without a scaler (research note §6.9), so the
    # plugin is built explicitly with a CPU GradScaler.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=5)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=7, kl=0.5, loss_scale=1.0))
    fit([ScalerShock(), guard], max_steps=8, module=module, plugins=[plugin])
    assert [(e["at_step"], e["to_step"]) for e in guard.rollback_events] == [(8, 5)]
    saved = load(tmp_path / "checkpoint_step_5.ckpt")["MixedPrecision"]
    assert saved["scale"] == 1024.0
    assert scaler.get_scale() == 1024.0  # back from 8.0


class RecordingObserver(NullObserver):
    def __init__(self) -> None:
        self.saved: list[int] = []
        self.rollbacks: list[tuple[int, int, str]] = []

    def on_checkpoint_saved(
        self, step: int, nbytes: int, blocking_seconds: float, write_seconds: float
    ) -> None:
        self.saved.append(step)

    def on_rollback(self, from_step: int, to_step: int, reason: str) -> None:
        self.rollbacks.append((from_step, to_step, reason))


def test_observers_hear_saves_and_rollbacks(tmp_path: Path) -> None:
    observer = RecordingObserver()
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=3, observers=[observer])
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=4, kl=0.5, loss_scale=1.0))
    fit([guard], max_steps=7, module=module)
    assert observer.saved == [0, 3, 6]
    assert observer.rollbacks == [(5, 3, "kl_spike")]


def test_certified_checkpoint_is_preferred_and_the_suspect_one_rejected(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=3, certify_after_steps=3)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=7, kl=0.5, loss_scale=1.0))
    fit([guard], max_steps=10, module=module)
    # Step 3 was certified at step 6; step 6 was still pending when step 8 went bad.
    assert [(e["at_step"], e["to_step"]) for e in guard.rollback_events] == [(8, 3)]
    statuses = {r.step: r.status for r in guard.history}
    assert statuses[3] == "certified" and statuses[6] == "rejected"
    assert statuses[9] == "pending"


def test_a_restored_state_whose_fault_comes_back_is_never_restored_again(tmp_path: Path) -> None:
    guard = RollbackCheckpoint(dirpath=tmp_path, save_every_n_steps=3, max_rollbacks=None)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=7, kl=0.5, persistent=True))
    fit([guard], max_steps=10, module=module)
    # Each restore is followed by the same fault: that state is rejected, the next goes older.
    assert [(e["at_step"], e["to_step"]) for e in guard.rollback_events] == [
        (8, 6),
        (9, 3),
        (10, 0),
    ]
    rejected = {r.step: r.note for r in guard.history if r.status == "rejected"}
    assert set(rejected) == {3, 6}
    assert all("the fault came back" in note for note in rejected.values())
