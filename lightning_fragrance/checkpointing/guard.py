"""`RollbackGuard`: the rollback policy shared by the plain-loop manager and the Lightning callback.

It keeps a ledger of saved checkpoints (step, metrics, status), judges each step through the
triggers, certifies checkpoints, picks the rollback target (with escalation), enforces the
rollback budget and records events. No I/O: the callers own files, models and optimizers, so
every rule here is tested with plain numbers. Under DDP every rank holds an identical guard fed
with identical (reduced) numbers, which is why all ranks take the same decision.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from lightning_fragrance.checkpointing.conditions import RollbackConditions
from lightning_fragrance.checkpointing.errors import RollbackBudgetExceeded
from lightning_fragrance.checkpointing.records import (
    CERTIFIED,
    PENDING,
    CheckpointRecord,
    CheckpointStatus,
    checkpoint_file_name,
)
from lightning_fragrance.checkpointing.triggers import Trigger, TriggerMonitor, Verdict

log = logging.getLogger("lightning_fragrance.checkpointing")

GUARD_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Observation:
    """What `RollbackGuard.observe` concluded about one step.

    Attributes:
        verdict: The trigger verdict (``verdict.fire`` means: act now).
        target: The checkpoint a rollback would restore now, if any.
        certified: Steps whose checkpoints became certified with this step.
    """

    verdict: Verdict
    target: CheckpointRecord | None
    certified: tuple[int, ...] = ()

    @property
    def fire(self) -> bool:
        """Whether a rollback (or a dry-run record) is due."""
        return self.verdict.fire

    @property
    def trigger(self) -> Trigger | None:
        """The rule that fired on this step, if any."""
        return self.verdict.bad


class RollbackGuard:
    """Decisions of the checkpoint/rollback engine (see module docstring).

    Args:
        conditions: Thresholds and policies.
        max_checkpoints: Retention of the store the ledger mirrors: entries the store's rule
            may delete are dropped from the ledger at the same time, so a decision never names
            a deleted file. None keeps every entry.
    """

    def __init__(
        self, conditions: RollbackConditions | None = None, max_checkpoints: int | None = None
    ) -> None:
        self.conditions = conditions or RollbackConditions()
        self.max_checkpoints = max_checkpoints
        self.monitor = TriggerMonitor(self.conditions)
        self.ledger: list[CheckpointRecord] = []
        self.events: list[dict[str, Any]] = []
        self.rollback_steps: list[int] = []
        self.last_rollback: tuple[int, int] | None = None
        self.last_bad_step = -1

    # ------------------------------------------------------------------ ledger
    def record_save(self, step: int, metrics: Mapping[str, float]) -> CheckpointRecord:
        """Add the checkpoint of ``step`` (called when it is staged, before it is durable)."""
        status = (
            CheckpointStatus.CERTIFIED
            if self.conditions.certify_after_steps == 0
            else CheckpointStatus.PENDING
        )
        record = CheckpointRecord(
            step=step,
            file=checkpoint_file_name(step),
            created_at=time.time(),
            metrics={str(k): float(v) for k, v in metrics.items()},
            status=status.value,
        )
        self.ledger = [e for e in self.ledger if e.step != step] + [record]
        self.ledger.sort(key=lambda r: r.step)
        self._apply_retention()
        return record

    def _apply_retention(self) -> None:
        """Drop what `CheckpointStore` retention may delete (the newest ``max_checkpoints``
        unpinned entries and the newest certified one stay). The store keeps at least these,
        so every ledger entry names a file that exists unless it was damaged; the rule is a
        function of the ledger alone, hence identical on every DDP rank."""
        if self.max_checkpoints is None:
            return
        unpinned = [e for e in self.ledger if not e.pinned]
        keep = {e.step for e in unpinned[-self.max_checkpoints :]}
        certified = [e for e in self.ledger if e.status == CERTIFIED]
        if certified:
            keep.add(certified[-1].step)
        self.ledger = [e for e in self.ledger if e.pinned or e.step in keep]

    def set_status(self, step: int, status: CheckpointStatus) -> None:
        """Change the status of a ledger entry (e.g. corrupt after a failed load)."""
        for entry in self.ledger:
            if entry.step == step:
                entry.status = status.value

    def forget(self, steps: set[int]) -> None:
        """Drop entries whose files no longer exist (retention, failed writes)."""
        self.ledger = [e for e in self.ledger if e.step not in steps]

    # ------------------------------------------------------------------ judging
    def observe(self, step: int, metrics: Mapping[str, float]) -> Observation:
        """Judge the metrics of ``step`` (call once per optimizer step).

        In "checkpoint" mode the baseline is the metrics of the checkpoint a rollback would
        restore now (the guide's semantics).
        """
        target = self.target(step)
        baseline = target.metrics if target is not None else None
        verdict = self.monitor.observe(metrics, baseline)
        if verdict.bad is not None:
            self.last_bad_step = step
            return Observation(verdict, target)
        return Observation(verdict, target, self._certify(step))

    def _certify(self, step: int) -> tuple[int, ...]:
        wait = self.conditions.certify_after_steps
        newly: list[int] = []
        for entry in self.ledger:
            if (
                entry.status == PENDING
                and step - entry.step >= wait
                and self.last_bad_step < entry.step
            ):
                entry.status = CERTIFIED
                newly.append(entry.step)
        return tuple(newly)

    def candidates(self, step: int) -> list[CheckpointRecord]:
        """Rollback targets in the order to try them (first = preferred).

        Certified checkpoints newest first, then uncertified ones newest first (better than
        nothing). Within ``escalate_within_steps`` of the last rollback, checkpoints older than
        the one restored then come first: it led back into the divergence, so go further back.
        The others stay in the list as fallbacks, in case every older file is damaged.
        """
        usable = [e for e in self.ledger if e.is_rollback_target and e.step <= step]
        certified = [e for e in usable if e.status == CERTIFIED]
        pending = [e for e in usable if e.status != CERTIFIED]
        ordered = certified[::-1] + pending[::-1]
        if self.escalating(step) and self.last_rollback is not None:
            to_step = self.last_rollback[1]
            older = [e for e in ordered if e.step < to_step]
            ordered = older + [e for e in ordered if e.step >= to_step]
        return ordered

    def target(self, step: int) -> CheckpointRecord | None:
        """The checkpoint a rollback at ``step`` would restore first, if any."""
        found = self.candidates(step)
        return found[0] if found else None

    def escalating(self, step: int) -> bool:
        """Whether a rollback at ``step`` would escalate past the last target."""
        window = self.conditions.escalate_within_steps
        return (
            window > 0 and self.last_rollback is not None and step - self.last_rollback[0] <= window
        )

    # ------------------------------------------------------------------ budget and events
    def rollbacks_in_window(self, step: int) -> int:
        """Rollbacks performed within the budget window ending at ``step``."""
        start = step - self.conditions.rollback_budget_window
        return sum(1 for s in self.rollback_steps if s > start)

    def check_budget(self, step: int, trigger: Trigger) -> None:
        """Raise `RollbackBudgetExceeded` when one more rollback would exceed the budget."""
        limit = self.conditions.max_rollbacks
        if limit is None:
            return
        used = self.rollbacks_in_window(step)
        if used < limit:
            return
        good = self.target(step)
        where = f"step={good.step} ({good.file})" if good else "none (no checkpoint committed)"
        raise RollbackBudgetExceeded(
            f"Rollback budget exhausted at step {step}: {trigger.message}, after {used} "
            f"rollback(s) within the last {self.conditions.rollback_budget_window} steps "
            f"(max_rollbacks={limit}). Stopping training instead of thrashing. Last good "
            f"checkpoint: {where}. Resume from it with lower learning rate or relaxed thresholds "
            "(configs/callbacks/rollback_relaxed.yaml)."
        )

    def record_rollback(
        self, at_step: int, restored: CheckpointRecord, trigger: Trigger, **details: Any
    ) -> dict[str, Any]:
        """Book a performed rollback; entries newer than the restored one are rejected (they
        belong to the abandoned branch). Returns the event."""
        self.rollback_steps.append(at_step)
        self.last_rollback = (at_step, restored.step)
        for entry in self.ledger:
            if entry.step > restored.step and entry.is_rollback_target:
                entry.status = CheckpointStatus.REJECTED.value
        self.monitor.reset_streak()
        event = self._event("rollback", at_step, restored.step, trigger, **details)
        self.events.append(event)
        return event

    def record_dry_run(
        self, at_step: int, target: CheckpointRecord | None, trigger: Trigger
    ) -> dict[str, Any]:
        """Book a trigger that was only observed (``dry_run``). Returns the event."""
        self.monitor.reset_streak()
        to_step = target.step if target is not None else None
        event = self._event("dry_run_trigger", at_step, to_step, trigger)
        self.events.append(event)
        return event

    @staticmethod
    def _event(
        kind: str, at_step: int, to_step: int | None, trigger: Trigger, **details: Any
    ) -> dict[str, Any]:
        return {
            "type": kind,
            "at_step": at_step,
            "to_step": to_step,
            "reason": trigger.reason.value,
            "message": trigger.message,
            "metric": trigger.metric,
            "value": trigger.value,
            "baseline": trigger.baseline,
            "time": time.time(),
            **details,
        }

    @property
    def rollback_count(self) -> int:
        """Rollbacks performed so far (dry-run triggers excluded)."""
        return len(self.rollback_steps)

    @property
    def rollback_events(self) -> list[dict[str, Any]]:
        """The events of performed rollbacks, oldest first."""
        return [e for e in self.events if e["type"] == "rollback"]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (weights_only-safe: lists, dicts, numbers, strings)."""
        return {
            "version": GUARD_STATE_VERSION,
            "ledger": [e.to_dict() for e in self.ledger],
            "events": [dict(e) for e in self.events],
            "rollback_steps": list(self.rollback_steps),
            "last_rollback": list(self.last_rollback) if self.last_rollback else None,
            "last_bad_step": self.last_bad_step,
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of `state_dict`."""
        self.ledger = [CheckpointRecord.from_dict(e) for e in state.get("ledger", [])]
        self.events = [dict(e) for e in state.get("events", [])]
        self.rollback_steps = [int(s) for s in state.get("rollback_steps", [])]
        last = state.get("last_rollback")
        self.last_rollback = (int(last[0]), int(last[1])) if last else None
        self.last_bad_step = int(state.get("last_bad_step", -1))
        self.monitor.load_state_dict(state.get("monitor", {}))
