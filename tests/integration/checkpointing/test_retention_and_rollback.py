"""Retention against what a rollback depends on, on a real local directory.

Retention deletes old files after newer commits; a rollback (and an escalation to an older
checkpoint) must then still find an intact target whenever one exists, and never be pointed at a
file that retention already removed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_fragrance.checkpointing import CheckpointManager, RollbackConditions


def _nets() -> tuple[nn.Linear, nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    policy, value = nn.Linear(4, 2), nn.Linear(4, 1)
    return policy, value, torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=1e-2)


def test_escalation_after_retention_removed_the_older_checkpoints_restores_an_intact_one(
    tmp_path: Path,
) -> None:
    manager = CheckpointManager(
        str(tmp_path),
        save_interval=5,
        max_checkpoints=1,
        rollback_conditions=RollbackConditions(escalate_within_steps=5),
        observers=[],
    )
    policy, value, optimizer = _nets()
    try:
        manager.save_checkpoint(5, policy, value, optimizer, loss=0.5, reward=20.0)
        with torch.no_grad():
            policy.weight.add_(1.0)
        manager.save_checkpoint(10, policy, value, optimizer, loss=0.5, reward=20.0)
        saved_at_10 = policy.weight.detach().clone()
        # Retention (max_checkpoints=1) removed step 5 once step 10 was committed.
        assert [r.step for r in manager.list_checkpoints()] == [10]

        assert manager.check_rollback(11, 1.2, 20.0).should_rollback
        first = manager.rollback(policy, value, optimizer)
        assert first is not None and first.step == 10

        # The spike repeats within the escalation window: an older checkpoint is preferred, but
        # none is left on disk or in memory. Step 10 is intact; the run must not die of
        # NoGoodCheckpointError ("No intact checkpoint to roll back to") while it is there.
        should, target, _ = manager.check_rollback(12, 1.2, 20.0)
        assert should
        assert target is not None and target.step == 10, (
            f"the decision names step {target.step if target else None}, whose file retention "
            "already deleted"
        )
        second = manager.rollback(policy, value, optimizer)
        assert second is not None and second.step == 10
        assert torch.equal(policy.weight, saved_at_10)
    finally:
        manager.close()
