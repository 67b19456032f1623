"""RollbackGuard: certification, targets, escalation, budget and its persisted state."""

from __future__ import annotations

import pytest

from lightning_fragrance.checkpointing import (
    CheckpointStatus,
    RollbackBudgetExceeded,
    RollbackConditions,
    RollbackGuard,
)

HEALTHY = {"loss": 1.0, "reward": 10.0, "kl_divergence": 0.001}
SPIKE = {"loss": 9.0, "reward": 10.0, "kl_divergence": 0.001}


def guard_with_saves(steps: list[int], **conditions: object) -> RollbackGuard:
    guard = RollbackGuard(RollbackConditions(**conditions))  # type: ignore[arg-type]
    for step in steps:
        guard.observe(step, HEALTHY)
        guard.record_save(step, HEALTHY)
    return guard


def rollback(guard: RollbackGuard, step: int) -> int:
    observation = guard.observe(step, SPIKE)
    assert observation.fire and observation.trigger is not None
    guard.check_budget(step, observation.trigger)
    target = guard.candidates(step)[0]
    guard.record_rollback(step, target, observation.trigger)
    return target.step


def test_default_target_is_the_newest_checkpoint() -> None:
    guard = guard_with_saves([100, 200, 300])
    assert rollback(guard, 350) == 300
    assert guard.rollback_count == 1
    assert guard.rollback_events[0]["at_step"] == 350
    assert guard.rollback_events[0]["to_step"] == 300


def test_checkpoint_is_certified_only_after_healthy_steps() -> None:
    guard = guard_with_saves([100], certify_after_steps=50)
    assert guard.ledger[0].status == CheckpointStatus.PENDING.value
    assert guard.observe(149, HEALTHY).certified == ()
    assert guard.observe(150, HEALTHY).certified == (100,)
    assert guard.ledger[0].status == CheckpointStatus.CERTIFIED.value


def test_uncertified_checkpoint_is_skipped_and_rejected_after_a_rollback() -> None:
    guard = guard_with_saves([100], certify_after_steps=50)
    guard.observe(150, HEALTHY)
    guard.record_save(200, HEALTHY)  # saved as the divergence began
    assert rollback(guard, 220) == 100
    statuses = {e.step: e.status for e in guard.ledger}
    assert statuses == {100: "certified", 200: "rejected"}
    assert guard.target(400) is not None and guard.target(400).step == 100  # type: ignore[union-attr]


def test_uncertified_checkpoint_is_used_when_nothing_is_certified() -> None:
    guard = guard_with_saves([100], certify_after_steps=50)
    assert rollback(guard, 120) == 100


def test_repeat_trigger_within_window_escalates_to_an_older_checkpoint() -> None:
    guard = guard_with_saves([100, 200, 300], escalate_within_steps=50)
    assert rollback(guard, 320) == 300
    assert rollback(guard, 360) == 200  # within 50 steps of the last rollback
    assert rollback(guard, 500) == 200  # outside the window: the newest good one again


def test_escalation_reuses_the_oldest_when_nothing_older_exists() -> None:
    guard = guard_with_saves([100], escalate_within_steps=50)
    assert rollback(guard, 120) == 100
    assert rollback(guard, 130) == 100


def test_budget_exceeded_names_the_last_good_checkpoint() -> None:
    guard = guard_with_saves([100], max_rollbacks=2, rollback_budget_window=100)
    rollback(guard, 110)
    rollback(guard, 120)
    with pytest.raises(RollbackBudgetExceeded, match=r"step=100 \(checkpoint_step_100.ckpt\)"):
        rollback(guard, 130)


def test_budget_window_slides() -> None:
    guard = guard_with_saves([100], max_rollbacks=1, rollback_budget_window=100)
    rollback(guard, 110)
    assert rollback(guard, 211) == 100  # the first one left the window


def test_zero_budget_stops_at_the_first_trigger() -> None:
    guard = guard_with_saves([100], max_rollbacks=0)
    with pytest.raises(RollbackBudgetExceeded, match="max_rollbacks=0"):
        rollback(guard, 150)


def test_unlimited_budget() -> None:
    guard = guard_with_saves([100], max_rollbacks=None, rollback_budget_window=10)
    for step in range(101, 120):
        rollback(guard, step)
    assert guard.rollback_count == 19


def test_dry_run_event_is_not_a_rollback() -> None:
    guard = guard_with_saves([100])
    observation = guard.observe(150, SPIKE)
    assert observation.trigger is not None
    event = guard.record_dry_run(150, observation.target, observation.trigger)
    assert event["type"] == "dry_run_trigger" and event["to_step"] == 100
    assert guard.rollback_count == 0 and guard.rollback_events == []


def test_state_dict_round_trip_keeps_ledger_counters_and_budget() -> None:
    guard = guard_with_saves([100, 200], max_rollbacks=1, escalate_within_steps=30)
    rollback(guard, 210)
    copy = RollbackGuard(guard.conditions)
    copy.load_state_dict(guard.state_dict())
    assert copy.rollback_count == 1
    assert [e.step for e in copy.ledger] == [100, 200]
    assert copy.last_rollback == (210, 200)
    assert copy.events == guard.events
    observation = copy.observe(220, SPIKE)
    assert observation.trigger is not None
    with pytest.raises(RollbackBudgetExceeded):
        copy.check_budget(220, observation.trigger)


def test_ledger_mirrors_store_retention_so_targets_exist() -> None:
    guard = RollbackGuard(RollbackConditions(escalate_within_steps=50), max_checkpoints=2)
    for step in (100, 200, 300):
        guard.observe(step, HEALTHY)
        guard.record_save(step, HEALTHY)
    assert [e.step for e in guard.ledger] == [200, 300]
    assert rollback(guard, 310) == 300
    assert rollback(guard, 320) == 200  # escalation stays within what exists
    assert rollback(guard, 330) == 200


def test_escalation_keeps_the_last_target_as_a_fallback() -> None:
    guard = guard_with_saves([100, 200], escalate_within_steps=50)
    assert rollback(guard, 210) == 200
    assert [e.step for e in guard.candidates(220)] == [100, 200]


def test_pinned_and_newest_certified_entries_survive_ledger_retention() -> None:
    guard = RollbackGuard(RollbackConditions(certify_after_steps=1000), max_checkpoints=1)
    guard.record_save(100, HEALTHY)
    guard.observe(1100, HEALTHY)  # certifies 100
    guard.record_save(1200, HEALTHY)
    guard.record_save(1300, HEALTHY)
    assert [e.step for e in guard.ledger] == [100, 1300]
