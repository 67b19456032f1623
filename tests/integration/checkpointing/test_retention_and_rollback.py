"""Retention against what a rollback depends on, on a real local directory.

Retention deletes old files after newer commits; a rollback (and an escalation to an older
checkpoint) must then still find an intact target whenever one exists, and never be pointed at a
file that retention already removed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_fragrance.checkpointing import CheckpointManager


def _nets() -> tuple[nn.Linear, nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    policy, value = nn.Linear(4, 2), nn.Linear(4, 1)
    return policy, value, torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=1e-2)


def test_retention_keeps_the_known_good_state_while_a_newer_one_is_unproven_for_escalation(
    tmp_path: Path,
) -> None:
    manager = CheckpointManager(str(tmp_path), save_interval=5, max_checkpoints=1, observers=[])
    policy, value, optimizer = _nets()
    try:
        manager.save_checkpoint(5, policy, value, optimizer, loss=0.5, reward=20.0)
        manager.check_rollback(6, 0.5, 20.0)
        saved_at_5 = policy.weight.detach().clone()
        with torch.no_grad():
            policy.weight.add_(1.0)
        manager.save_checkpoint(10, policy, value, optimizer, loss=0.5, reward=20.0)
        # max_checkpoints=1, but step 10 is not proven yet: the known-good 5 stays on disk.
        assert [r.step for r in manager.list_checkpoints()] == [5, 10]
        manager.check_rollback(11, 0.5, 20.0)
        saved_at_10 = policy.weight.detach().clone()

        assert manager.check_rollback(12, 1.2, 20.0).should_rollback
        first = manager.rollback(policy, value, optimizer)
        assert first is not None and first.step == 10
        assert torch.equal(policy.weight, saved_at_10)

        # The spike is back on the first reading after the restore: step 10 led into it and is
        # never restored again; the rollback escalates to the intact older file.
        should, target, _ = manager.check_rollback(13, 1.2, 20.0)
        assert should and target is not None and target.step == 5
        second = manager.rollback(policy, value, optimizer)
        assert second is not None and second.step == 5
        assert torch.equal(policy.weight, saved_at_5)
        assert {r.step: r.status for r in manager.list_checkpoints()}[10] == "rejected"
    finally:
        manager.close()
