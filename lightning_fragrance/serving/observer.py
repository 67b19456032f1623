"""The metrics seam: ``HotReloadManager`` events → ``OperationsMetricsCollector``.

The manager reports through the small ``ReloadObserver`` protocol so that it imports no
Prometheus; this adapter is the one place that knows the collector's recorders.
"""

from __future__ import annotations

from lightning_fragrance.labels import DrainTimeoutAction, ReloadPhase, ReloadResult
from lightning_fragrance.monitoring import OperationsMetricsCollector
from lightning_fragrance.monitoring.metrics import ModelLine


class CollectorReloadObserver:
    """Records reload phases, results, model versions and drain timeouts with the collector.

    Every line's events go to the ``model_line_*`` metrics under its ``model`` label; the
    policy line's also go to the ``model_*`` metrics without it (their meaning before the brief
    LLM had a line, which alerts and panels rely on).

    Args:
        collector: the process's ``OperationsMetricsCollector``.
        model: the model line this observer's manager serves (default: the policy).
    """

    def __init__(
        self, collector: OperationsMetricsCollector, model: ModelLine | str = ModelLine.POLICY
    ) -> None:
        self.collector = collector
        self.model = ModelLine(model)
        self._policy = self.model is ModelLine.POLICY
        self.drain_timeouts: dict[str, int] = {}
        self.abandoned_loads = 0

    def on_phase(self, phase: ReloadPhase, seconds: float) -> None:
        """Observe ``model_line_reload_phase_seconds{model,phase}`` (and the policy's own)."""
        if self._policy:
            self.collector.record_reload_phase(phase, seconds)
        self.collector.record_line_reload_phase(self.model, phase, seconds)

    def on_reload(self, result: ReloadResult) -> None:
        """Count ``model_line_reload_total{model,result}`` (and ``model_reload_total``)."""
        if self._policy:
            self.collector.record_model_reload(result)
        self.collector.record_line_reload(self.model, result)

    def on_model_info(self, role: str, version: str, value: float) -> None:
        """Keep ``model_line_info`` (and the policy's ``model_info``) in step with the roles."""
        if value:
            if self._policy:
                self.collector.set_model_version(version, role)
            self.collector.set_line_version(self.model, version, role)
        elif role == "draining":
            if self._policy:
                self.collector.retire_model_version(version)
            self.collector.retire_line_version(self.model, version)
        # ("current", 0) is followed by ("draining", 1) for the same version, which moves it.

    def on_drain_timeout(self, remaining: int, action: DrainTimeoutAction) -> None:
        """Count ``model_line_drain_timeout_requests_total{model,action}`` (and the policy's
        ``model_reload_drain_timeout_requests_total{action}``) and, in ``GET /admin/model``."""
        if self._policy:
            self.collector.record_drain_timeout(remaining, action)
        self.collector.record_line_drain_timeout(self.model, remaining, action)
        self.drain_timeouts[action.value] = self.drain_timeouts.get(action.value, 0) + remaining

    def on_inflight(self, worker: str, value: int) -> None:
        """In-flight requests are already tracked per process by ``track_api_request``."""

    def on_load_abandoned(self, version: str | None) -> None:
        """Count a loader abandoned past its deadline (``GET /admin/model``,
        ``model_line_reload_abandoned_loads_total{model}`` and the policy's
        ``model_reload_abandoned_loads_total``).

        The failed reload itself is counted as ``load_failed`` in the reload totals.
        """
        self.abandoned_loads += 1
        if self._policy:
            self.collector.record_abandoned_load()
        self.collector.record_line_abandoned_load(self.model)
