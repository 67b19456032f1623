"""The metrics seam: ``HotReloadManager`` events → ``OperationsMetricsCollector``.

The manager reports through the small ``ReloadObserver`` protocol so that it imports no
Prometheus; this adapter is the one place that knows the collector's recorders.
"""

from __future__ import annotations

from lightning_fragrance.labels import DrainTimeoutAction, ReloadPhase, ReloadResult
from lightning_fragrance.monitoring import OperationsMetricsCollector


class CollectorReloadObserver:
    """Records reload phases, results, ``model_info`` and drain timeouts with the collector.

    Args:
        collector: the process's ``OperationsMetricsCollector``.
    """

    def __init__(self, collector: OperationsMetricsCollector) -> None:
        self.collector = collector
        self.drain_timeouts: dict[str, int] = {}
        self.abandoned_loads = 0

    def on_phase(self, phase: ReloadPhase, seconds: float) -> None:
        """Observe ``model_reload_phase_seconds{phase}`` (every phase the manager times)."""
        self.collector.record_reload_phase(phase, seconds)

    def on_reload(self, result: ReloadResult) -> None:
        """Count ``model_reload_total{result}`` (``rolled_back`` for a rollback or revert)."""
        self.collector.record_model_reload(result)

    def on_model_info(self, role: str, version: str, value: float) -> None:
        """Keep ``model_info{role,version}`` in step with the worker roles."""
        if value:
            self.collector.set_model_version(version, role)
        elif role == "draining":
            self.collector.retire_model_version(version)
        # ("current", 0) is followed by ("draining", 1) for the same version, which moves it.

    def on_drain_timeout(self, remaining: int, action: DrainTimeoutAction) -> None:
        """Count ``model_reload_drain_timeout_requests_total{action}``; ``GET /admin/model`` too."""
        self.collector.record_drain_timeout(remaining, action)
        self.drain_timeouts[action.value] = self.drain_timeouts.get(action.value, 0) + remaining

    def on_inflight(self, worker: str, value: int) -> None:
        """In-flight requests are already tracked per process by ``track_api_request``."""

    def on_load_abandoned(self, version: str | None) -> None:
        """Count a loader abandoned past its deadline (``GET /admin/model``).

        The failed reload itself is counted as ``model_reload_total{result="load_failed"}``.
        """
        self.abandoned_loads += 1
        self.collector.record_abandoned_load()
