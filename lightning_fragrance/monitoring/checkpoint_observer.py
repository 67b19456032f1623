"""`PrometheusCheckpointObserver`: feeds checkpoint events of the checkpointing engine to metrics.

The checkpointing engine reports saves, rollbacks and errors to observers (a small structural
interface, ``CheckpointObserver``), so it needs no metrics import and this module needs no
checkpointing import: the methods below match that protocol by name and signature.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from lightning_fragrance.labels import RollbackReason
from lightning_fragrance.monitoring.collector import OperationsMetricsCollector
from lightning_fragrance.monitoring.metrics import GuardThreshold

log = logging.getLogger(__name__)


def rollback_reason_label(reason: object) -> str:
    """The ``checkpoint_rollbacks_total{reason}`` value of ``reason``: a `RollbackReason` member
    or its value as the engine reports it; anything else is ``other`` (the label stays bounded)."""
    try:
        return RollbackReason(getattr(reason, "value", reason)).value
    except ValueError:
        return RollbackReason.OTHER.value


class PrometheusCheckpointObserver:
    """A ``CheckpointObserver`` that records into an ``OperationsMetricsCollector``.

    Feeds ``checkpoint_saves_total{result}``, ``checkpoint_rollbacks_total{reason}``,
    ``checkpoint_save_seconds{phase}`` and ``rl_guard_threshold{threshold}``. Attach it with
    ``RollbackCheckpoint(observers=[PrometheusCheckpointObserver(collector)])``, or use
    ``PrometheusLogger.checkpoint_observer`` so the events are pushed with the training metrics.
    A metrics failure is logged and swallowed: metrics must never break a checkpoint save.

    Args:
        collector: Collector built with the checkpoint group.
    """

    def __init__(self, collector: OperationsMetricsCollector) -> None:
        self.collector = collector

    def on_guard_start(self, run_id: str, thresholds: Mapping[str, float]) -> None:
        """A guarded fit starts: publish the guard's thresholds as ``rl_guard_threshold``.

        The alerts compare each run's values with these instead of constants, so a task whose
        healthy KL is 0.1 under a 0.3 guard does not page at the guide's 0.03 (issue 10,
        item 15). The series carry the labels of the collector's other series (the logger's
        ``run_id`` grouping key), not ``run_id`` here: the guard's id may differ from it.
        Names outside ``GuardThreshold`` are skipped.
        """
        known = {item.value for item in GuardThreshold}
        for name, value in thresholds.items():
            if name not in known:
                log.debug("guard threshold %r of run %s is not published", name, run_id)
                continue
            try:
                self.collector.set_guard_threshold(name, float(value))
            except (TypeError, ValueError, RuntimeError):
                log.exception("could not publish the guard threshold %s=%r", name, value)

    def on_checkpoint_saved(
        self, step: int, nbytes: int, blocking_seconds: float, write_seconds: float
    ) -> None:
        """A checkpoint was committed."""
        try:
            self.collector.record_checkpoint_save(blocking_seconds, write_seconds)
        except (ValueError, RuntimeError):
            log.exception("could not record the checkpoint save of step %d", step)

    def on_rollback(self, from_step: int, to_step: int, reason: str) -> None:
        """Training rolled back from ``from_step`` to the checkpoint of ``to_step``."""
        try:
            self.collector.record_rollback(rollback_reason_label(reason))
        except (ValueError, RuntimeError):
            log.exception("could not record the rollback %d -> %d", from_step, to_step)

    def on_checkpoint_error(self, step: int, error: BaseException) -> None:
        """Saving the checkpoint of ``step`` failed."""
        try:
            self.collector.record_checkpoint_error()
        except RuntimeError:
            log.exception("could not record the checkpoint error of step %d", step)
