"""`RollbackGuard`: the decisions of the rollback engine, as functions of numbers and steps.

Two rules above the others (DESIGN.md §5):

1. *Fresh evidence.* Each watched value arrives as a `Reading` that says when it was produced.
   A reading is judged once, and only if it is newer than the last one of its signal and
   reflects no state older than the last restore. Real RL code logs once per epoch or per
   rollout: the value Lightning shows can be minutes old, and judging it again after a rollback
   fires the same trigger on the restored state. Freshness is never inferred from a change of
   value (a reward that levels off at a constant is still fresh).
2. *Known-good targets.* A checkpoint becomes a rollback target only once every watched signal
   produced a healthy value after its state. A checkpoint whose first fresh evidence is bad is
   rejected (it may hold the fault with healthy-looking stale metrics). A suspicious state is
   never saved. A state restored once whose post-restore evidence shows the fault again is
   rejected too, and the next rollback escalates to the next older known-good state.

No I/O: the orchestrator owns files, models and optimizers. Under DDP every rank holds an
identical guard fed with identical (reduced) readings, so all ranks take the same decision.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_fragrance.checkpointing.conditions import RollbackConditions
from lightning_fragrance.checkpointing.errors import CheckpointError, RollbackBudgetExceeded
from lightning_fragrance.checkpointing.records import (
    CERTIFIED,
    PENDING,
    CheckpointRecord,
    CheckpointStatus,
    Reading,
    Trigger,
    checkpoint_file_name,
)
from lightning_fragrance.checkpointing.triggers import TriggerMonitor, Verdict

log = logging.getLogger("lightning_fragrance.checkpointing")

GUARD_STATE_VERSION = 2
"""Version of `RollbackGuard.state_dict` (2: freshness and known-good targets)."""

REJECTED = CheckpointStatus.REJECTED.value


@dataclasses.dataclass(frozen=True)
class Observation:
    """What `RollbackGuard.observe` concluded from one batch of readings.

    Attributes:
        verdict: The trigger verdict on the fresh readings; None when nothing was fresh.
        target: The checkpoint a rollback would restore now, if any.
        certified: Steps whose checkpoints became known-good with these readings.
        fresh: Names of the signals that were judged.
    """

    verdict: Verdict | None
    target: CheckpointRecord | None
    certified: tuple[int, ...] = ()
    fresh: tuple[str, ...] = ()

    @property
    def fire(self) -> bool:
        """Whether a rollback (or a dry-run record) is due."""
        return self.verdict is not None and self.verdict.fire

    @property
    def trigger(self) -> Trigger | None:
        """The rule that fired on these readings, if any."""
        return self.verdict.bad if self.verdict is not None else None


class RollbackGuard:
    """Decisions of the checkpoint/rollback engine (see module docstring).

    Args:
        conditions: Thresholds and policies.
        max_checkpoints: Retention of the store the ledger mirrors: entries the store's rule
            may delete are dropped from the ledger at the same time, so a decision never names
            a deleted file. None keeps every entry.
        signals: The signals the caller watches (e.g. loss, reward, KL). A checkpoint is
            certified only once each of them produced a healthy value after it, so a reward
            logged once per epoch is waited for even before its first value arrived. Signals
            seen in readings join the set; `drop_signal` removes one that is never produced.
        run_id: The run whose lineage the ledger holds (recorded in each entry).
    """

    def __init__(
        self,
        conditions: RollbackConditions | None = None,
        max_checkpoints: int | None = None,
        signals: Iterable[str] = (),
        run_id: str = "",
    ) -> None:
        self.conditions = conditions or RollbackConditions()
        self.max_checkpoints = max_checkpoints
        self.run_id = run_id
        self.monitor = TriggerMonitor(self.conditions)
        self.ledger: list[CheckpointRecord] = []
        self.events: list[dict[str, Any]] = []
        self.rollback_steps: list[int] = []
        self.last_rollback: tuple[int, int] | None = None
        self.signals: set[str] = set(signals)
        self.last_judged: dict[str, int] = {}
        self.last_healthy: dict[str, float] = {}
        self.restored_at = -1
        self.probation: int | None = None
        self.bad_since: int | None = None

    # ------------------------------------------------------------------ ledger
    def record_save(
        self, step: int, metrics: Mapping[str, float], *, initial: bool = False
    ) -> CheckpointRecord:
        """Add the checkpoint of ``step`` (called when it is staged, before it is durable).

        With ``certify`` it starts ``pending``; the guide's mode certifies it at once.
        """
        certified = not self.conditions.certify
        record = CheckpointRecord(
            step=step,
            file=checkpoint_file_name(step),
            created_at=time.time(),
            metrics={str(k): float(v) for k, v in metrics.items()},
            status=CERTIFIED if certified else PENDING,
            run_id=self.run_id,
            initial=initial,
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

    def set_status(self, step: int, status: CheckpointStatus, note: str = "") -> None:
        """Change the status of a ledger entry (e.g. corrupt after a failed load)."""
        for entry in self.ledger:
            if entry.step == step:
                entry.status = status.value
                entry.note = note or entry.note

    def forget(self, steps: set[int]) -> None:
        """Drop entries whose files no longer exist (retention, failed writes)."""
        self.ledger = [e for e in self.ledger if e.step not in steps]

    def drop_signal(self, name: str) -> None:
        """Stop waiting for ``name`` before certifying: the run never produces it."""
        self.signals.discard(name)

    # ------------------------------------------------------------------ judging
    def fresh_readings(
        self, step: int, readings: Mapping[str, Reading | float]
    ) -> dict[str, Reading]:
        """The readings that may be judged now: produced after the last judged value of their
        signal, reflecting no state older than the last restore, and not from the future.
        Plain numbers count as produced at ``step`` (the guide's loop)."""
        fresh: dict[str, Reading] = {}
        for name, item in readings.items():
            reading = item if isinstance(item, Reading) else Reading(float(item), step)
            if reading.produced_at > step:
                continue
            if reading.produced_at <= self.last_judged.get(name, -math.inf):
                continue
            if reading.first_state < self.restored_at:
                continue
            fresh[name] = reading
        return fresh

    def observe(self, step: int, readings: Mapping[str, Reading | float]) -> Observation:
        """Judge the fresh ones among ``readings`` at ``step`` (stale ones are ignored).

        In "checkpoint" mode the baseline is the rollback target's: the metrics recorded with
        it, completed by the evidence that certified it.
        """
        fresh = self.fresh_readings(step, readings)
        if not fresh:
            return Observation(None, self.target(step))
        for name, reading in fresh.items():
            self.last_judged[name] = reading.produced_at
            self.signals.add(name)
        values = {name: reading.value for name, reading in fresh.items()}
        target = self.target(step)
        verdict = self.monitor.observe(values, target.baseline() if target else None)
        names = tuple(sorted(fresh))
        if verdict.bad is not None:
            if self.bad_since is None:
                self.bad_since = min(r.produced_at for r in fresh.values())
            return Observation(verdict, target, fresh=names)
        self.bad_since = None
        self.last_healthy.update(values)
        on_probation = self.probation
        certified = self._certify(step, fresh)
        if certified or self.probation != on_probation:  # the candidates changed
            target = self.target(step)
        return Observation(verdict, target, certified, names)

    def _certify(self, step: int, fresh: Mapping[str, Reading]) -> tuple[int, ...]:
        """Healthy fresh readings become evidence for the pending states they came after."""
        newly: list[int] = []
        for entry in self.ledger:
            if entry.status != PENDING:
                continue
            for name, reading in fresh.items():
                if reading.first_state >= entry.step and name not in entry.evidence:
                    entry.evidence[name] = reading.value
            complete = self.signals <= entry.evidence.keys()
            if complete and step - entry.step >= self.conditions.certify_after_steps:
                entry.status = CERTIFIED
                newly.append(entry.step)
        if self.probation is not None and self.signals <= set(self._post_restore_evidence()):
            self.probation = None  # the restored state proved itself again
        return tuple(newly)

    def _post_restore_evidence(self) -> list[str]:
        return [n for n, produced in self.last_judged.items() if produced > self.restored_at]

    @property
    def suspicious(self) -> bool:
        """Whether the newest judged evidence was bad: no save may happen now."""
        return self.bad_since is not None

    def candidates(self, step: int) -> list[CheckpointRecord]:
        """Rollback targets in the order to try them (first = preferred).

        With ``certify``: known-good (certified) states newest first, then the run's initial
        state as a last resort while it is not proven damaged. A state on probation (restored,
        and its post-restore evidence not in yet) comes last: if the fault is back, it is the
        one that led into it. Without ``certify`` (the guide): every target, newest first.
        """
        usable = [e for e in self.ledger if e.is_rollback_target and e.step <= step]
        if self.conditions.certify:
            ordered = [e for e in usable if e.status == CERTIFIED][::-1]
            ordered += [e for e in usable if e.initial and e.status == PENDING]
        else:
            ordered = usable[::-1]
        if self.probation is not None:
            ordered = [e for e in ordered if e.step != self.probation]
        return ordered

    def target(self, step: int) -> CheckpointRecord | None:
        """The checkpoint a rollback at ``step`` would restore first, if any."""
        found = self.candidates(step)
        return found[0] if found else None

    def last_known_good(self) -> CheckpointRecord | None:
        """The newest certified state, whatever the rollback history."""
        certified = [e for e in self.ledger if e.status == CERTIFIED]
        return certified[-1] if certified else None

    # ------------------------------------------------------------------ budget and events
    def rollbacks_in_window(self, step: int) -> int:
        """Restores performed within the budget window ending at ``step``."""
        start = step - self.conditions.rollback_budget_window
        return sum(1 for s in self.rollback_steps if s > start)

    def check_budget(self, step: int, trigger: Trigger) -> None:
        """Raise `RollbackBudgetExceeded` when one more restore would exceed the budget."""
        limit = self.conditions.max_rollbacks
        if limit is None:
            return
        used = self.rollbacks_in_window(step)
        if used < limit:
            return
        good = self.last_known_good()
        where = f"step={good.step} ({good.file})" if good else "none (no state was proven good)"
        raise RollbackBudgetExceeded(
            f"Rollback budget exhausted at step {step}: {trigger.message}, after {used} "
            f"restore(s) within the last {self.conditions.rollback_budget_window} steps "
            f"(max_rollbacks={limit}). Stopping training instead of thrashing. Last known-good "
            f"checkpoint: {where}. Resume from it with a lower learning rate or relaxed "
            "thresholds (configs/callbacks/rollback_relaxed.yaml)."
        )

    def reject_unproven(self, at_step: int, trigger: Trigger) -> list[int]:
        """On a fire: reject every pending state (its first fresh evidence is this fault),
        and the state on probation (restored, and the fault came back). Returns their steps."""
        rejected: list[int] = []
        for entry in self.ledger:
            if not entry.is_rollback_target:
                continue
            if entry.step == self.probation:
                note = (
                    f"restored at step {self.restored_at}, and the fault came back at step "
                    f"{at_step} ({trigger.message})"
                )
            elif entry.status == PENDING and not entry.initial:
                note = (
                    f"no healthy evidence after it: the fault was detected at step {at_step} "
                    f"({trigger.message})"
                )
            else:
                continue
            entry.status, entry.note = REJECTED, note
            rejected.append(entry.step)
        if rejected:
            self.probation = None
        return rejected

    def record_rollback(
        self, at_step: int, restored: CheckpointRecord, trigger: Trigger, **details: Any
    ) -> dict[str, Any]:
        """Book a performed restore. Entries newer than the restored one belong to the abandoned
        branch and are rejected; the restored state is on probation until fresh evidence after
        the restore is in. Returns the event."""
        self.rollback_steps.append(at_step)
        self.last_rollback = (at_step, restored.step)
        for entry in self.ledger:
            if entry.step > restored.step and entry.is_rollback_target:
                entry.status = REJECTED
                entry.note = entry.note or f"abandoned branch: rolled back to step {restored.step}"
        self.restored_at = at_step
        self.probation = restored.step
        self.bad_since = None
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
            "reason": trigger.code,
            "message": trigger.message,
            "metric": trigger.metric,
            "value": trigger.value,
            "baseline": trigger.baseline,
            "time": time.time(),
            **details,
        }

    @property
    def rollback_count(self) -> int:
        """Restores performed so far (dry-run triggers excluded)."""
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
            "run_id": self.run_id,
            "ledger": [e.to_dict() for e in self.ledger],
            "events": [dict(e) for e in self.events],
            "rollback_steps": list(self.rollback_steps),
            "last_rollback": list(self.last_rollback) if self.last_rollback else None,
            "signals": sorted(self.signals),
            "last_judged": dict(self.last_judged),
            "last_healthy": dict(self.last_healthy),
            "restored_at": self.restored_at,
            "probation": self.probation,
            "bad_since": self.bad_since,
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of `state_dict`; version 1 states (before freshness) are adopted.

        Raises:
            CheckpointError: The state was written by a newer version of this package.
        """
        version = int(state.get("version", 1))
        if version > GUARD_STATE_VERSION:
            raise CheckpointError(
                f"The rollback guard state has version {version}, newer than this "
                f"lightning_fragrance understands ({GUARD_STATE_VERSION}): upgrade the package, "
                "or resume without the callback state (a new history directory)."
            )
        self.run_id = str(state.get("run_id", self.run_id))
        self.ledger = [CheckpointRecord.from_dict(e) for e in state.get("ledger", [])]
        self.events = [dict(e) for e in state.get("events", [])]
        self.rollback_steps = [int(s) for s in state.get("rollback_steps", [])]
        last = state.get("last_rollback")
        self.last_rollback = (int(last[0]), int(last[1])) if last else None
        self.signals |= {str(s) for s in state.get("signals", [])}
        self.last_judged = {str(k): int(v) for k, v in state.get("last_judged", {}).items()}
        self.last_healthy = {str(k): float(v) for k, v in state.get("last_healthy", {}).items()}
        self.restored_at = int(state.get("restored_at", -1))
        probation, bad_since = state.get("probation"), state.get("bad_since")
        self.probation = None if probation is None else int(probation)
        self.bad_since = None if bad_since is None else int(bad_since)
        self.monitor.load_state_dict(state.get("monitor", {}))
