"""CheckpointManager: the operations guide's API in a plain PyTorch loop."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_fragrance.checkpointing import (
    CheckpointManager,
    NoGoodCheckpointError,
    RollbackConditions,
)


def nets() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 2))
    value = nn.Linear(4, 1)
    optimizer = torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=1e-2)
    return policy, value, optimizer


def train_step(policy: nn.Module, value: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    x = torch.randn(8, 4)
    loss = policy(x).pow(2).mean() + value(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def test_guide_scenario_logs_the_guide_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy, value, optimizer = nets()
    caplog.set_level(logging.INFO, logger="lightning_fragrance")
    with CheckpointManager(str(tmp_path), save_interval=500, max_checkpoints=5) as manager:
        assert not manager.should_save(499) and manager.should_save(500)
        manager.save_checkpoint(1000, policy, value, optimizer, loss=0.5, reward=20.0)
        # Healthy evidence produced after the save makes step 1000 a known-good target.
        assert manager.check_rollback(1100, 0.45, 22.0) == (False, None, None)
        should_rollback, checkpoint, reason = manager.check_rollback(1200, 1.2, 18.0)
        assert should_rollback and reason is not None and reason.code == "loss_spike"
        assert str(reason) == "loss spike 0.50 -> 1.20 (2.40x)"  # the guide's [롤백 트리거] text
        assert checkpoint is not None and checkpoint.step == 1000
        restored = manager.rollback(policy, value, optimizer)
        assert restored is not None and restored.step == 1000
        assert manager.rollback_count == 1
    messages = [r.getMessage() for r in caplog.records]
    assert "Rollback triggered: loss spike 0.50 -> 1.20 (2.40x)" in messages
    assert "Rolled back to step=1000, loss=0.5000, reward=20.0000" in messages


def test_saving_uses_step_at_or_past_the_next_multiple(tmp_path: Path) -> None:
    policy, value, optimizer = nets()
    manager = CheckpointManager(str(tmp_path), save_interval=5, async_save=False)
    saved = []
    for step in range(3, 31, 3):  # e.g. three optimizer steps per batch
        if manager.should_save(step):
            manager.save_checkpoint(step, policy, value, optimizer, 1.0, 1.0)
            saved.append(step)
    assert saved == [6, 12, 15, 21, 27, 30]


def test_rollback_restores_weights_adam_state_and_rng_exactly(tmp_path: Path) -> None:
    policy, value, optimizer = nets()
    for _ in range(3):
        train_step(policy, value, optimizer)
    manager = CheckpointManager(str(tmp_path), save_interval=1, keep_in_memory=False)
    manager.save_checkpoint(3, policy, value, optimizer, loss=1.0, reward=1.0)
    assert not manager.check_rollback(4, 1.0, 1.0).should_rollback  # certifies step 3
    saved_policy = {k: v.clone() for k, v in policy.state_dict().items()}
    saved_state = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state.items()}
    expected_draws = (torch.rand(3), np.random.rand(3), random.random())
    for _ in range(4):
        train_step(policy, value, optimizer)
    assert manager.check_rollback(7, float("nan"), 1.0).should_rollback
    manager.rollback(policy, value, optimizer)
    for key, tensor in policy.state_dict().items():
        assert torch.equal(tensor, saved_policy[key])
    for param, state in optimizer.state.items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name], saved_state[param][name])
    draws = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], expected_draws[0])
    assert np.array_equal(draws[1], expected_draws[1]) and draws[2] == expected_draws[2]
    manager.close()


def test_in_memory_rollback_does_not_alias_the_snapshot(tmp_path: Path) -> None:
    policy, value, optimizer = nets()
    train_step(policy, value, optimizer)
    manager = CheckpointManager(str(tmp_path), save_interval=1)
    manager.save_checkpoint(1, policy, value, optimizer, loss=1.0, reward=1.0)
    manager.check_rollback(1, 1.0, 1.0, produced_at=1)  # evidence about state 0: too old
    assert manager.find_stable_checkpoint() is None
    manager.check_rollback(2, 1.0, 1.0)  # produced after state 1: it is known-good
    weights = [p.detach().clone() for p in policy.parameters()]
    for step in (3, 5):
        train_step(policy, value, optimizer)
        assert manager.check_rollback(step, float("inf"), 1.0).should_rollback
        manager.rollback(policy, value, optimizer)
        manager.check_rollback(step + 1, 1.0, 1.0)  # healthy after the restore
        # Both rollbacks land on the same state: the first one's training did not leak
        # into the snapshot through aliased optimizer tensors.
        assert all(torch.equal(p, w) for p, w in zip(policy.parameters(), weights, strict=True))
    manager.close()


def test_corrupt_newest_file_falls_back_to_the_next_older(tmp_path: Path) -> None:
    policy, value, optimizer = nets()
    manager = CheckpointManager(str(tmp_path), save_interval=10, keep_in_memory=False)
    manager.save_checkpoint(10, policy, value, optimizer, loss=1.0, reward=1.0)
    manager.check_rollback(11, 1.0, 1.0)
    train_step(policy, value, optimizer)
    manager.save_checkpoint(20, policy, value, optimizer, loss=1.0, reward=1.0)
    manager.check_rollback(21, 1.0, 1.0)
    manager.flush()
    path = tmp_path / "checkpoint_step_20.ckpt"
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    assert manager.check_rollback(25, 5.0, 1.0).should_rollback
    restored = manager.rollback(policy, value, optimizer)
    assert restored is not None and restored.step == 10
    assert {r.step: r.status for r in manager.list_checkpoints()}[20] == "corrupt"
    manager.close()


def test_no_intact_checkpoint_left_is_a_clear_error(tmp_path: Path) -> None:
    policy, value, optimizer = nets()
    manager = CheckpointManager(str(tmp_path), save_interval=10, keep_in_memory=False)
    manager.save_checkpoint(10, policy, value, optimizer, loss=1.0, reward=1.0)
    manager.check_rollback(11, 1.0, 1.0)
    manager.flush()
    path = tmp_path / "checkpoint_step_10.ckpt"
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    assert manager.check_rollback(15, 5.0, 1.0).should_rollback
    with pytest.raises(NoGoodCheckpointError, match=r"No intact checkpoint.*integrity check"):
        manager.rollback(policy, value, optimizer)
    manager.close()


def test_trigger_before_any_checkpoint_returns_none(tmp_path: Path) -> None:
    policy, value, optimizer = nets()
    with CheckpointManager(str(tmp_path)) as manager:
        decision = manager.check_rollback(3, 1.0, 1.0, current_kl_divergence=0.5)
        assert decision.should_rollback and decision.checkpoint is None
        assert decision.reason is not None and decision.reason.code == "kl_spike"
        assert manager.rollback(policy, value, optimizer) is None


def test_reopened_directory_offers_its_checkpoints_as_targets(tmp_path: Path) -> None:
    policy, value, optimizer = nets()
    with CheckpointManager(str(tmp_path), save_interval=10) as manager:
        manager.save_checkpoint(10, policy, value, optimizer, loss=0.5, reward=2.0)
        manager.check_rollback(11, 0.5, 2.0)
    with CheckpointManager(str(tmp_path), save_interval=10, resume=True) as reopened:
        assert not reopened.should_save(19) and reopened.should_save(20)
        stable = reopened.find_stable_checkpoint()
        assert stable is not None and stable.step == 10
        assert reopened.check_rollback(12, 2.0, 2.0).should_rollback
        restored = reopened.rollback(policy, value, optimizer)
        assert restored is not None and restored.sha256


def test_budget_exceeded_stops_the_loop(tmp_path: Path) -> None:
    from lightning_fragrance.checkpointing import RollbackBudgetExceeded

    policy, value, optimizer = nets()
    conditions = RollbackConditions(max_rollbacks=1)
    with CheckpointManager(str(tmp_path), save_interval=1, rollback_conditions=conditions) as m:
        m.save_checkpoint(1, policy, value, optimizer, loss=1.0, reward=1.0)
        assert not m.check_rollback(2, 1.0, 1.0).should_rollback
        assert m.check_rollback(3, 9.0, 1.0).should_rollback
        m.rollback(policy, value, optimizer)
        assert not m.check_rollback(4, 1.0, 1.0).should_rollback  # step 1 proved itself again
        with pytest.raises(RollbackBudgetExceeded, match=r"checkpoint_step_1\.ckpt"):
            m.check_rollback(5, 9.0, 1.0)
