"""`FabricRollbackGuard` in a single-process Fabric loop: what a rollback restores, the files it
writes, and the freshness rule through the adapter (the 2-rank run is in
tests/integration/fabric)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_fragrance.checkpointing import (
    CheckpointCorruptError,
    CheckpointDirectoryError,
    CheckpointError,
    Reading,
    RollbackConditions,
)
from lightning_fragrance.fabric import RNG_KEY, FabricRollbackGuard

SAVE_EVERY = 3


def _loop_objects(fabric: Fabric) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model, optimizer = fabric.setup(model, optimizer)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "temperature": 1.0}


def _update(fabric: Fabric, state: dict[str, Any]) -> float:
    x = torch.randn(16, 4)
    loss = ((state["model"](x) - x.sum(1, keepdim=True)) ** 2).mean()
    state["optimizer"].zero_grad()
    fabric.backward(loss)
    state["optimizer"].step()
    state["scheduler"].step()
    return float(loss.detach())


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    optimizer = state["optimizer"].optimizer
    return {
        "weights": {k: v.clone() for k, v in state["model"].state_dict().items()},
        "moments": [s["exp_avg"].clone() for s in optimizer.state.values()],
        "lr": optimizer.param_groups[0]["lr"],
        "scheduler_epoch": state["scheduler"].last_epoch,
        "temperature": state["temperature"],
    }


@pytest.fixture
def fabric() -> Fabric:
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    return fabric


def _metrics(loss: float) -> dict[str, float]:
    return {"train/loss": loss, "train/reward": 1.0, "train/kl": 0.001}


@pytest.mark.parametrize("keep_in_memory", [True, False], ids=["from_memory", "from_file"])
def test_a_loss_spike_restores_module_optimizer_scheduler_and_plain_values_in_place(
    fabric: Fabric, tmp_path: Path, keep_in_memory: bool
) -> None:
    state = _loop_objects(fabric)
    guard = FabricRollbackGuard(
        fabric, tmp_path, save_every_n_steps=SAVE_EVERY, keep_in_memory=keep_in_memory
    )
    live_model, live_optimizer = state["model"], state["optimizer"]
    guard.start(state)
    saved: dict[str, Any] = {}
    for step in range(1, 5):
        state["temperature"] = float(step)
        outcome = guard.step(step, _metrics(_update(fabric, state)), state)
        if outcome.saved is not None and outcome.saved.step == SAVE_EVERY:
            saved = _snapshot(state)
    assert saved, "the save of step 3 happened"
    _update(fabric, state)
    state["temperature"] = 99.0
    outcome = guard.step(5, _metrics(1e6), state)  # a loss spike; step 4 certified step 3

    assert outcome.restored is not None and outcome.restored.step == SAVE_EVERY
    now = _snapshot(state)
    for key, tensor in saved["weights"].items():
        assert torch.equal(now["weights"][key], tensor), key
    for before, after in zip(saved["moments"], now["moments"], strict=True):
        assert torch.equal(before, after)
    assert (now["lr"], now["scheduler_epoch"]) == (saved["lr"], saved["scheduler_epoch"])
    assert now["temperature"] == saved["temperature"] == 3.0
    # In place: the loop keeps its objects, and the next update starts from clean gradients.
    assert state["model"] is live_model and state["optimizer"] is live_optimizer
    assert all(p.grad is None for p in live_model.parameters())
    events = guard.rollback_events
    assert [(e["at_step"], e["to_step"], e["from_memory"]) for e in events] == [
        (5, 3, keep_in_memory)
    ]
    guard.close()


def test_the_files_are_what_fabric_load_restores_with_weights_only(
    fabric: Fabric, tmp_path: Path
) -> None:
    state = _loop_objects(fabric)
    with FabricRollbackGuard(fabric, tmp_path, save_every_n_steps=SAVE_EVERY) as guard:
        guard.start(state)
        for step in range(1, SAVE_EVERY + 1):
            guard.step(step, _metrics(_update(fabric, state)), state)
        expected = {k: v.clone() for k, v in state["model"].state_dict().items()}
        files = [r.file for r in guard.history]
    assert files == ["checkpoint_step_0.ckpt", f"checkpoint_step_{SAVE_EVERY}.ckpt"]

    fresh = _loop_objects(fabric)
    remainder = fabric.load(tmp_path / files[-1], fresh, weights_only=True)
    for key, tensor in expected.items():
        assert torch.equal(fresh["model"].state_dict()[key], tensor), key
    assert fresh["temperature"] == 1.0 and fresh["scheduler"].last_epoch == SAVE_EVERY
    assert set(remainder) == {RNG_KEY}


def test_a_stale_reading_never_triggers_twice(fabric: Fabric, tmp_path: Path) -> None:
    state = _loop_objects(fabric)
    conditions = RollbackConditions(kl_threshold=0.5)
    guard = FabricRollbackGuard(
        fabric, tmp_path, save_every_n_steps=SAVE_EVERY, rollback_conditions=conditions
    )
    guard.start(state)
    for step in range(1, 5):
        loss = torch.tensor(_update(fabric, state))  # 0-d tensors are read as this step's
        guard.step(step, {"train/loss": loss, "train/reward": 1.0, "train/kl": 0.01}, state)
    # A reward logged once per rollout: the bad KL of step 5 is still the newest at step 6.
    spike = {"train/kl": Reading(7.0, produced_at=5)}
    assert guard.step(5, spike, state).restored is not None
    assert guard.step(6, spike, state).restored is None
    assert guard.rollback_count == 1
    guard.close()


def test_another_runs_directory_is_refused_with_the_ways_out(
    fabric: Fabric, tmp_path: Path
) -> None:
    state = _loop_objects(fabric)
    with FabricRollbackGuard(fabric, tmp_path, save_every_n_steps=SAVE_EVERY) as first:
        first.start(state)
    with pytest.raises(CheckpointDirectoryError, match="overwrite=True"):
        FabricRollbackGuard(fabric, tmp_path, save_every_n_steps=SAVE_EVERY)
    resumed = FabricRollbackGuard(fabric, tmp_path, save_every_n_steps=SAVE_EVERY, resume=True)
    assert resumed.start(state) is None  # the run's initial state is already a target
    assert resumed.store.run_id == first.store.run_id
    resumed.close()


def test_remedies_scale_the_restored_learning_rates_and_reseed_after_a_rollback(
    fabric: Fabric, tmp_path: Path
) -> None:
    state = _loop_objects(fabric)
    guard = FabricRollbackGuard(
        fabric, tmp_path, save_every_n_steps=SAVE_EVERY, lr_factor=0.5, reseed=True
    )
    guard.start(state)
    lr_at_save = base_lr = 0.0
    for step in range(1, 5):
        outcome = guard.step(step, _metrics(_update(fabric, state)), state)
        if outcome.saved is not None and outcome.saved.step == SAVE_EVERY:
            lr_at_save = state["optimizer"].param_groups[0]["lr"]
            base_lr = state["scheduler"].base_lrs[0]
    _update(fabric, state)
    assert guard.step(5, _metrics(1e6), state).restored is not None
    assert state["optimizer"].param_groups[0]["lr"] == pytest.approx(lr_at_save * 0.5)
    assert state["scheduler"].base_lrs[0] == pytest.approx(base_lr * 0.5)
    event = guard.rollback_events[-1]
    assert event["lr_factor"] == 0.5 and isinstance(event["reseed"], int)
    guard.close()


def test_a_resumed_guard_loads_the_newest_intact_checkpoint_after_checking_its_sha256(
    fabric: Fabric, tmp_path: Path
) -> None:
    state = _loop_objects(fabric)
    with FabricRollbackGuard(fabric, tmp_path, save_every_n_steps=SAVE_EVERY) as guard:
        guard.start(state)
        for step in range(1, 2 * SAVE_EVERY + 1):
            guard.step(step, _metrics(_update(fabric, state)), state)
            if step == SAVE_EVERY:
                expected = {k: v.clone() for k, v in state["model"].state_dict().items()}
        run_id = guard.store.run_id
    newest = tmp_path / f"checkpoint_step_{2 * SAVE_EVERY}.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot in the newest file
    newest.write_bytes(bytes(data))

    fresh = _loop_objects(fabric)
    with FabricRollbackGuard(fabric, tmp_path, SAVE_EVERY, resume=True) as resumed:
        record = resumed.load(fresh)
        assert record.step == SAVE_EVERY and resumed.store.run_id == run_id
        for key, tensor in expected.items():
            assert torch.equal(fresh["model"].state_dict()[key], tensor), key
        statuses = {r.step: r.status for r in resumed.history}
        assert statuses[2 * SAVE_EVERY] == "corrupt"
        with pytest.raises(CheckpointCorruptError, match=newest.name):
            resumed.load(fresh, step=2 * SAVE_EVERY)
        with pytest.raises(CheckpointError, match="lists no checkpoint of step 99"):
            resumed.load(fresh, step=99)
