"""The guard's host-memory budget: the plan for each budget (pure), and what the orchestrator
does with it (one staged set shared by the snapshot and the writer; below one copy,
synchronous writes from the live state and rollbacks from the file)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_fragrance.checkpointing import CheckpointManager
from lightning_fragrance.checkpointing.memory_budget import plan_host_memory, state_nbytes


def test_the_default_budget_of_one_copy_shares_one_set_between_snapshot_and_writer() -> None:
    plan = plan_host_memory(10**9, None, async_save=True, keep_in_memory=True)
    assert (plan.staged_sets, plan.snapshot, plan.fallback) == (1, True, "")


def test_an_unbounded_budget_keeps_the_three_set_pipeline() -> None:
    plan = plan_host_memory(10**9, math.inf, async_save=True, keep_in_memory=True)
    assert (plan.staged_sets, plan.snapshot) == (3, True)
    assert plan_host_memory(10**9, 2.5e9, async_save=True, keep_in_memory=True).staged_sets == 2


def test_below_one_copy_saves_write_the_live_state_and_the_reason_has_the_numbers() -> None:
    plan = plan_host_memory(2 * 10**9, 10**9, async_save=True, keep_in_memory=True)
    assert (plan.staged_sets, plan.snapshot) == (0, False)
    for figure in ("1.00 GB", "2.00 GB", "synchronously", "rollbacks read the file"):
        assert figure in plan.fallback


def test_state_size_counts_every_tensor_in_nested_containers() -> None:
    state = {"a": torch.zeros(10), "b": [torch.zeros(2, 3, dtype=torch.float64), 7], "c": "x"}
    assert state_nbytes(state) == 10 * 4 + 6 * 8


def _nets() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = nn.Linear(16, 16)
    return net, torch.optim.Adam(net.parameters(), lr=1e-2)


def _train(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 16)
    optimizer.zero_grad()
    (net(x) - x).pow(2).mean().backward()
    optimizer.step()


def test_one_copy_saves_reuse_the_snapshot_buffers_and_it_still_serves_rollbacks(
    tmp_path: Path,
) -> None:
    manager = CheckpointManager(str(tmp_path), save_interval=2)
    net, optimizer = _nets()
    pointers, weights = [], {}
    for step in range(1, 6):
        _train(net, optimizer)
        manager.check_rollback(step, 0.5, 1.0, 0.001)
        if manager.should_save(step):
            manager.save_checkpoint(step, net, None, optimizer, 0.5, 1.0, 0.001)
            snapshot = manager.engine.snapshot
            assert snapshot is not None and snapshot.step == step
            pointers.append(snapshot.payload["policy_state_dict"]["weight"].data_ptr())
            weights[step] = net.weight.detach().clone()
    assert len(set(pointers)) == 1  # saves 1, 2, 4: one set of buffers, no second copy
    _train(net, optimizer)
    assert manager.check_rollback(6, 100.0, 1.0, 0.001).should_rollback
    restored = manager.rollback(net, None, optimizer)
    assert restored is not None and restored.step == 4
    assert manager.rollback_events[-1]["from_memory"] is True
    assert torch.equal(net.weight, weights[4])
    for record in manager.list_checkpoints():  # every file holds its own step
        stored = manager.store.load(record)["policy_state_dict"]["weight"]
        assert torch.equal(stored, weights[record.step])
    manager.close()


def test_below_one_copy_saves_are_synchronous_warn_once_and_roll_back_from_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(str(tmp_path), save_interval=2, host_memory_budget=1024)
    net, optimizer = _nets()
    weights = {}
    with caplog.at_level(logging.WARNING, logger="lightning_fragrance.checkpointing"):
        for step in range(1, 6):
            _train(net, optimizer)
            manager.check_rollback(step, 0.5, 1.0, 0.001)
            if manager.should_save(step):
                manager.save_checkpoint(step, net, None, optimizer, 0.5, 1.0, 0.001)
                weights[step] = net.weight.detach().clone()
                assert manager.engine.snapshot is None
                # Synchronous: committed before save_checkpoint returned.
                assert manager.store.record(step) is not None
    warnings = [r.getMessage() for r in caplog.records if "below one copy" in r.getMessage()]
    assert len(warnings) == 1 and "0.00 GB" in warnings[0]
    _train(net, optimizer)
    assert manager.check_rollback(6, 100.0, 1.0, 0.001).should_rollback
    restored = manager.rollback(net, None, optimizer)
    assert restored is not None and restored.step == 4
    assert manager.rollback_events[-1]["from_memory"] is False
    assert torch.equal(net.weight, weights[4])
    manager.close()
