"""Observer interface through which the engine reports saves, rollbacks and errors.

The metrics pillar attaches Prometheus here, so `checkpointing` imports no metrics code
(DESIGN.md §5). Observers may be called from the background writer thread: implementations must
be thread-safe (prometheus_client metrics are).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

log = logging.getLogger("lightning_fragrance.checkpointing")


@runtime_checkable
class CheckpointObserver(Protocol):
    """What the engine reports. Subclass `NullObserver` to implement only some methods."""

    def on_checkpoint_saved(
        self, step: int, nbytes: int, blocking_seconds: float, write_seconds: float
    ) -> None:
        """A checkpoint was committed (file renamed into place and listed in the history).

        Args:
            step: Its step.
            nbytes: File size.
            blocking_seconds: Time the training thread spent staging it.
            write_seconds: Background time from dequeue to history committed.
        """

    def on_rollback(self, from_step: int, to_step: int, reason: str) -> None:
        """Training state was restored from ``to_step`` at ``from_step`` (``reason`` a value of
        `RollbackReason`)."""

    def on_checkpoint_error(self, step: int, error: BaseException) -> None:
        """Writing or loading the checkpoint of ``step`` failed; training goes on."""


class NullObserver:
    """No-op base class: override the methods you need.

    Besides the protocol's methods, an observer may define ``on_guard_start(run_id,
    thresholds)``: called once when a guarded run starts, with the configured thresholds
    (``kl_threshold``, ``loss_increase_multiplier``, ``reward_drop_threshold``), so metrics and
    alerts can compare against what this run uses.
    """

    def on_guard_start(self, run_id: str, thresholds: Mapping[str, float]) -> None:
        """Ignored."""

    def on_checkpoint_saved(
        self, step: int, nbytes: int, blocking_seconds: float, write_seconds: float
    ) -> None:
        """Ignored."""

    def on_rollback(self, from_step: int, to_step: int, reason: str) -> None:
        """Ignored."""

    def on_checkpoint_error(self, step: int, error: BaseException) -> None:
        """Ignored."""


class LoggingObserver(NullObserver):
    """Default observer: one log line per save (debug) and per error (error).

    Rollbacks are logged by the engine itself with the guide's wording.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    def on_checkpoint_saved(
        self, step: int, nbytes: int, blocking_seconds: float, write_seconds: float
    ) -> None:
        self._log.info(
            "Checkpoint saved: step=%d, %.1f MB, blocking %.1f ms, write %.1f ms",
            step,
            nbytes / 1e6,
            blocking_seconds * 1e3,
            write_seconds * 1e3,
        )

    def on_checkpoint_error(self, step: int, error: BaseException) -> None:
        self._log.error(
            "Checkpoint of step=%d failed: %s: %s. Training continues without it; rollbacks "
            "use the checkpoints already committed, if any (lf-checkpoints list shows them).",
            step,
            type(error).__name__,
            error,
        )


class ObserverGroup(NullObserver):
    """Fans every report out to several observers; one failing observer never stops the others
    nor the training."""

    def __init__(self, observers: Iterable[CheckpointObserver]) -> None:
        self.observers = list(observers)

    def _each(self, method: str, *args: object) -> None:
        for observer in self.observers:
            fn = getattr(observer, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception:  # an observer bug must not take the run down
                log.exception("Checkpoint observer %r failed in %s", observer, method)

    def on_guard_start(self, run_id: str, thresholds: Mapping[str, float]) -> None:
        self._each("on_guard_start", run_id, dict(thresholds))

    def on_checkpoint_saved(
        self, step: int, nbytes: int, blocking_seconds: float, write_seconds: float
    ) -> None:
        self._each("on_checkpoint_saved", step, nbytes, blocking_seconds, write_seconds)

    def on_rollback(self, from_step: int, to_step: int, reason: str) -> None:
        self._each("on_rollback", from_step, to_step, reason)

    def on_checkpoint_error(self, step: int, error: BaseException) -> None:
        self._each("on_checkpoint_error", step, error)
