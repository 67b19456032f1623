"""RollbackGuard: fresh evidence, known-good targets, escalation, budget, persisted state."""

from __future__ import annotations

import pytest

from lightning_fragrance.checkpointing import (
    CheckpointError,
    CheckpointStatus,
    Reading,
    RollbackBudgetExceeded,
    RollbackConditions,
    RollbackGuard,
)

HEALTHY = {"loss": 1.0, "reward": 10.0, "kl_divergence": 0.001}
SPIKE = {"loss": 9.0, "reward": 10.0, "kl_divergence": 0.001}


def guard_with_saves(steps: list[int], **conditions: object) -> RollbackGuard:
    """Healthy readings at each save step, then a save; one more healthy reading after each."""
    guard = RollbackGuard(RollbackConditions(**conditions))  # type: ignore[arg-type]
    for step in steps:
        guard.observe(step, HEALTHY)
        guard.record_save(step, HEALTHY)
        guard.observe(step + 1, HEALTHY)
    return guard


def rollback(guard: RollbackGuard, step: int, values: dict[str, float] = SPIKE) -> int:
    observation = guard.observe(step, values)
    assert observation.fire and observation.trigger is not None
    guard.reject_unproven(step, observation.trigger)
    guard.check_budget(step, observation.trigger)
    target = guard.candidates(step)[0]
    guard.record_rollback(step, target, observation.trigger)
    return target.step


def statuses(guard: RollbackGuard) -> dict[int, str]:
    return {e.step: e.status for e in guard.ledger}


def test_a_checkpoint_becomes_a_target_only_after_a_healthy_reading_produced_after_it() -> None:
    guard = RollbackGuard()
    guard.observe(100, HEALTHY)
    guard.record_save(100, HEALTHY)
    assert guard.target(100) is None
    assert guard.observe(101, HEALTHY).certified == (100,)
    assert guard.target(101) is not None and guard.target(101).step == 100  # type: ignore[union-attr]


def test_a_save_whose_first_fresh_evidence_is_bad_is_rejected_and_the_older_one_used() -> None:
    guard = guard_with_saves([100, 200])
    guard.observe(300, HEALTHY)
    guard.record_save(300, HEALTHY)  # the fault happened just before: metrics not showing yet
    assert rollback(guard, 301) == 200
    assert statuses(guard) == {100: "certified", 200: "certified", 300: "rejected"}
    assert "no healthy evidence after it" in guard.ledger[-1].note


def test_a_stale_value_is_never_judged_twice_and_not_after_a_restore() -> None:
    guard = guard_with_saves([100])
    assert rollback(guard, 150) == 100
    # The same value, still shown by the framework (an epoch-level metric): not judged again.
    assert guard.observe(151, {"loss": Reading(9.0, produced_at=150)}).verdict is None
    # Produced after the restore but reflecting states before it: not judged either.
    epoch = Reading(9.0, produced_at=160, since=140)
    assert guard.observe(160, {"loss": epoch}).verdict is None
    assert guard.observe(161, {"loss": Reading(1.0, produced_at=161)}).verdict is not None


def test_a_value_that_levels_off_at_a_constant_is_still_fresh() -> None:
    guard = RollbackGuard()
    for step in range(1, 6):
        observation = guard.observe(step, {"reward": 5.0})
        assert observation.fresh == ("reward",)


def test_epoch_level_evidence_certifies_only_checkpoints_before_the_epoch_began() -> None:
    guard = RollbackGuard(signals=["loss", "reward"])
    guard.observe(5, {"loss": 1.0})
    guard.record_save(5, {"loss": 1.0})
    guard.observe(6, {"loss": 1.0})
    assert statuses(guard) == {5: "pending"}  # the reward is watched but not in yet
    guard.observe(8, {"reward": Reading(10.0, produced_at=8, since=0)})
    assert statuses(guard) == {5: "pending"}  # that epoch began before the checkpoint
    guard.observe(16, {"reward": Reading(10.0, produced_at=16, since=8)})
    assert statuses(guard) == {5: "certified"}


def test_the_initial_state_is_the_last_resort_until_proven_damaged() -> None:
    guard = RollbackGuard()
    guard.record_save(0, {}, initial=True)
    assert rollback(guard, 1, {"kl_divergence": 5.0}) == 0
    observation = guard.observe(2, {"kl_divergence": 5.0})  # the fault is back
    assert observation.fire and observation.trigger is not None
    assert guard.reject_unproven(2, observation.trigger) == [0]
    assert guard.target(2) is None
    assert "fault came back" in guard.ledger[0].note


def test_a_restored_state_whose_fault_comes_back_is_rejected_and_the_next_rollback_escalates() -> (
    None
):
    guard = guard_with_saves([100, 200])
    assert rollback(guard, 250) == 200
    assert rollback(guard, 252) == 100
    assert statuses(guard) == {100: "certified", 200: "rejected"}
    assert guard.rollback_count == 2


def test_healthy_evidence_after_a_restore_ends_the_probation() -> None:
    guard = guard_with_saves([100, 200])
    assert rollback(guard, 250) == 200
    guard.observe(251, HEALTHY)
    assert guard.probation is None
    assert rollback(guard, 300) == 200  # a new fault: the state proved itself again


def test_a_suspicious_step_is_never_saved_with_patience() -> None:
    guard = guard_with_saves([100], patience=2)
    observation = guard.observe(200, SPIKE)
    assert not observation.fire and guard.suspicious
    assert guard.observe(201, HEALTHY).fire is False and not guard.suspicious


def test_the_checkpoint_baseline_is_the_recorded_metrics_completed_by_the_evidence() -> None:
    guard = RollbackGuard()
    guard.record_save(0, {}, initial=True)
    guard.observe(1, {"loss": 0.5, "reward": 20.0})
    fired = guard.observe(2, {"loss": 1.2, "reward": 20.0})
    assert fired.fire and fired.trigger is not None
    assert str(fired.trigger) == "loss spike 0.50 -> 1.20 (2.40x)"
    assert fired.trigger.code == "loss_spike"


def test_without_certify_the_newest_checkpoint_is_the_target_at_once() -> None:
    guard = RollbackGuard(RollbackConditions(certify=False))
    guard.record_save(100, HEALTHY)
    guard.record_save(200, HEALTHY)
    assert guard.target(200) is not None and guard.target(200).step == 200  # type: ignore[union-attr]


def test_certify_after_steps_waits_longer() -> None:
    guard = RollbackGuard(RollbackConditions(certify_after_steps=50))
    guard.record_save(100, HEALTHY)
    assert guard.observe(149, HEALTHY).certified == ()
    assert guard.observe(150, HEALTHY).certified == (100,)


def test_budget_exceeded_names_the_last_known_good_checkpoint() -> None:
    guard = guard_with_saves([100, 200, 300], max_rollbacks=1)
    rollback(guard, 350)
    guard.observe(351, HEALTHY)
    observation = guard.observe(360, SPIKE)
    assert observation.trigger is not None
    with pytest.raises(RollbackBudgetExceeded, match=r"Last known-good checkpoint: step=300"):
        guard.check_budget(360, observation.trigger)


def test_budget_window_slides() -> None:
    guard = guard_with_saves([100], max_rollbacks=1, rollback_budget_window=100)
    rollback(guard, 150)
    guard.observe(151, HEALTHY)
    assert rollback(guard, 260) == 100


def test_unlimited_budget() -> None:
    guard = guard_with_saves([100], max_rollbacks=None)
    for step in range(150, 160, 2):
        rollback(guard, step)
        guard.observe(step + 1, HEALTHY)
    assert guard.rollback_count == 5


def test_dry_run_event_is_not_a_rollback() -> None:
    guard = guard_with_saves([100])
    observation = guard.observe(150, SPIKE)
    assert observation.trigger is not None
    event = guard.record_dry_run(150, observation.target, observation.trigger)
    assert event["type"] == "dry_run_trigger" and event["to_step"] == 100
    assert event["message"] == "loss spike 1.00 -> 9.00 (9.00x)"
    assert guard.rollback_count == 0


def test_state_dict_round_trip_keeps_ledger_freshness_and_budget() -> None:
    guard = guard_with_saves([100, 200], max_rollbacks=5)
    rollback(guard, 250)
    restored = RollbackGuard(RollbackConditions(max_rollbacks=5))
    restored.load_state_dict(guard.state_dict())
    assert statuses(restored) == statuses(guard)
    assert restored.last_judged == guard.last_judged
    assert restored.restored_at == 250 and restored.probation == 200
    assert restored.rollback_count == 1


def test_a_state_from_a_newer_version_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match=r"version 99.*upgrade"):
        RollbackGuard().load_state_dict({"version": 99})


def test_ledger_mirrors_store_retention_so_targets_exist() -> None:
    guard = RollbackGuard(RollbackConditions(), max_checkpoints=2)
    for step in (100, 200, 300, 400):
        guard.observe(step, HEALTHY)
        guard.record_save(step, HEALTHY)
    assert [e.step for e in guard.ledger] == [300, 400]


def test_pinned_and_newest_certified_entries_survive_ledger_retention() -> None:
    guard = RollbackGuard(RollbackConditions(), max_checkpoints=1)
    guard.record_save(100, HEALTHY)
    guard.observe(101, HEALTHY)
    guard.ledger[0].pinned = True
    guard.record_save(200, HEALTHY)
    guard.observe(201, HEALTHY)
    guard.record_save(300, HEALTHY)
    assert [e.step for e in guard.ledger] == [100, 200, 300]
    assert guard.ledger[1].status == CheckpointStatus.CERTIFIED.value
