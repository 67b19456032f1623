"""`OperationsMetricsCollector`: the operations guide's metrics API over prometheus_client.

One object owns every metric of the catalogue (``metrics.py``) in one registry and offers the
guide's recorders (``record_llm_brief``, ``track_llm_brief``, ``record_rl_update``,
``record_api_request``, ``track_api_request``) plus recorders for checkpoint saves, rollbacks and
model reloads. Input is validated (a wrong label value raises ``ValueError`` naming the allowed
values) so a typo cannot create a new time series, and free-form labels are capped.

Works in prometheus_client multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR`` before the process
imports prometheus_client (e.g. for ``uvicorn --workers N``); ``exposition()`` then merges the
files of every worker.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from lightning_fragrance.monitoring.metrics import (
    BRIEF_STATUSES,
    HTTP_METHODS,
    RELOAD_TIMED_PHASES,
    REPAIR_TYPE_ALIASES,
    SAVE_PHASES,
    SAVE_RESULTS,
    BriefMode,
    DrainTimeoutAction,
    DroppedValueReason,
    GuardThreshold,
    LossType,
    MetricGroup,
    MetricSpec,
    MetricType,
    ModelLine,
    ModelRole,
    ReloadPhase,
    ReloadResult,
    RepairType,
    RollbackReason,
    repair_type_value,
    spec,
    specs,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The ``*_created`` series double every counter and histogram in the exposition and the pushes;
# Prometheus 2.x ignores them in the text format. Process-wide, like the client's own switch.
disable_created_metrics()

_ALGORITHM_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# A path segment that is an id rather than a route word: 123, a UUID, a long hex digest.
_RAW_SEGMENT_RE = re.compile(
    r"^(\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{16,})$"
)


def multiprocess_dir() -> str | None:
    """Directory of prometheus_client's multiprocess mode, or None in single-process mode."""
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None


def _choice(label: str, value: str | Enum, allowed: tuple[str, ...]) -> str:
    text = str(value.value) if isinstance(value, Enum) else value
    if text not in allowed:
        raise ValueError(f"unknown {label} {value!r}: allowed values are {', '.join(allowed)}")
    return text


def _finite(name: str, value: float, *, non_negative: bool = False) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if non_negative and number < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return number


class BriefOutcome:
    """Context manager returned by ``track_llm_brief``; mark the brief repaired or failed inside.

    A plain class rather than ``@contextmanager``: a generator-based context manager costs a
    few microseconds more per request (benchmarks/bench_metrics_overhead.py).
    """

    __slots__ = ("_collector", "_start", "failed", "mode", "repair_type", "repaired")

    def __init__(self, collector: OperationsMetricsCollector, mode: str) -> None:
        self._collector = collector
        self.mode = mode
        self.repaired = False
        self.repair_type: str | None = None
        self.failed = False
        self._start = 0.0

    def mark_repaired(self, repair_type: str | RepairType = RepairType.OTHER) -> None:
        """Record that the answer needed a repair of this type (validated when recorded).

        The operations guide's names are accepted as aliases (``"code_block"`` counts as
        ``code_fence``: ``REPAIR_TYPE_ALIASES``).
        """
        self.repaired = True
        self.repair_type = repair_type_value(repair_type)

    def mark_failed(self) -> None:
        """Record the brief as a failure even though no exception escaped."""
        self.failed = True

    def __enter__(self) -> BriefOutcome:
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.failed = True  # and the exception propagates
        self._collector.record_llm_brief(
            self.mode,
            not self.failed,
            time.perf_counter() - self._start,
            self.repaired,
            self.repair_type,
        )


class ApiRequestOutcome:
    """Context manager returned by ``track_api_request``; status 200 by default, 500 on error."""

    __slots__ = ("_collector", "_inflight", "_start", "endpoint", "method", "status_code")

    def __init__(self, collector: OperationsMetricsCollector, endpoint: str, method: str) -> None:
        self._collector = collector
        self.endpoint = endpoint
        self.method = method
        self.status_code: int | None = None
        self._inflight = collector._child("inflight_requests", (collector.worker,))
        self._start = 0.0

    def set_status_code(self, status_code: int) -> None:
        """Set the HTTP status code the response carries."""
        self.status_code = status_code

    def __enter__(self) -> ApiRequestOutcome:
        self._inflight.inc()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._inflight.dec()
        status = self.status_code
        if status is None:
            status = 200 if exc_type is None else 500
        self._collector.record_api_request(
            self.endpoint, self.method, status, time.perf_counter() - self._start
        )


@dataclass
class _LabelBudget:
    """Caps the distinct values of a free-form label so a bug cannot explode cardinality."""

    label: str
    limit: int
    seen: set[str] = field(default_factory=set)

    def admit(self, value: str) -> None:
        if value in self.seen:
            return
        if len(self.seen) >= self.limit:
            raise ValueError(
                f"{self.label} {value!r} would be distinct value number {len(self.seen) + 1}, over "
                f"the cap of {self.limit} (seen: {sorted(self.seen)[:10]}...); use a bounded "
                f"vocabulary or raise the cap"
            )
        self.seen.add(value)


class OperationsMetricsCollector:
    """Records the operations metrics of training and serving (names from the operations guide).

    Args:
        registry: Where the metrics are registered. ``None`` uses prometheus_client's default
            ``REGISTRY`` (what ``prometheus_client.make_asgi_app()`` serves); pass a fresh
            ``CollectorRegistry()`` for a second collector in one process or in tests.
        groups: Metric groups to create (default: all). The training logger asks for the RL,
            checkpoint and logger groups so a training job never exports empty serving series.
        max_endpoints: Cap on distinct ``endpoint`` label values.
        max_versions: Cap on distinct ``version`` label values of ``model_info``.
        worker: Value of the ``worker`` label of ``inflight_requests`` (default: the process id).

    Raises:
        ValueError: When a metric of the catalogue is already registered in ``registry``.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        groups: frozenset[MetricGroup] | None = None,
        max_endpoints: int = 64,
        max_versions: int = 256,
        worker: str | None = None,
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        self.groups = frozenset(MetricGroup) if groups is None else frozenset(groups)
        self.worker = worker or str(os.getpid())
        self._metrics: dict[str, Any] = {}
        # Children cached per label tuple: .labels() costs ~1.5 us, a cached child ~0.4 us
        # (research note §0), which keeps a recorder within 1.5x of the raw client calls.
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        # Validated label sets of the two per-request recorders -> their children.
        self._brief_children: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}
        self._api_children: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self._vocabulary_children: dict[tuple[str, str | Enum], Any] = {}
        self._lock = threading.Lock()
        self._endpoints = _LabelBudget("endpoint", max_endpoints)
        self._algorithms = _LabelBudget("algorithm", 16)
        self._versions = _LabelBudget("version", max_versions)
        self._model_roles: dict[str, str] = {}
        self._line_roles: dict[tuple[str, str], str] = {}
        for item in specs(self.groups):
            if not item.dynamic_labels:
                self._metrics[item.name] = self._create(item)
        self._preinitialise()

    # ------------------------------------------------------------------ construction

    def _create(self, item: MetricSpec, labels: tuple[str, ...] | None = None) -> Any:
        names = item.labels if labels is None else labels
        try:
            if item.type is MetricType.COUNTER:
                return Counter(item.base_name, item.help, names, registry=self.registry)
            if item.type is MetricType.HISTOGRAM:
                return Histogram(
                    item.base_name,
                    item.help,
                    names,
                    registry=self.registry,
                    buckets=item.buckets or Histogram.DEFAULT_BUCKETS,
                )
            return Gauge(
                item.base_name,
                item.help,
                names,
                registry=self.registry,
                multiprocess_mode=item.multiprocess_mode,  # type: ignore[arg-type]
            )
        except ValueError as exc:
            raise ValueError(
                f"cannot register {item.name}: {exc}. Each OperationsMetricsCollector needs its "
                f"own registry; pass registry=CollectorRegistry() for a second one in a process"
            ) from exc

    def _preinitialise(self) -> None:
        """Create the known label combinations at 0 so rate() and alerts see them from start."""
        for item in specs(self.groups & {MetricGroup.RL}):
            if item.type is MetricType.GAUGE and not item.labels:
                # NaN = "no value yet": a reward of 0 before the first update would paint the
                # reward panel red and could trip the alerts; NaN compares false everywhere.
                self._metrics[item.name].set(math.nan)
        if MetricGroup.LLM in self.groups:
            for mode in BriefMode:
                self._latency_child(mode.value)
                for status in BRIEF_STATUSES:
                    self._child("llm_brief_total", (mode.value, status))
                for repair in RepairType:
                    self._child("llm_brief_repairs_total", (mode.value, repair.value))
        if MetricGroup.CHECKPOINT in self.groups:
            for result in SAVE_RESULTS:
                self._child("checkpoint_saves_total", (result,))
            for reason in RollbackReason:
                self._child("checkpoint_rollbacks_total", (reason.value,))
            for phase in SAVE_PHASES:
                self._child("checkpoint_save_seconds", (phase,))
        if MetricGroup.RELOAD in self.groups:
            for reload_result in ReloadResult:
                self._child("model_reload_total", (reload_result.value,))
            for reload_phase in RELOAD_TIMED_PHASES:
                self._child("model_reload_phase_seconds", (reload_phase.value,))
            for action in DrainTimeoutAction:
                self._child("model_reload_drain_timeout_requests_total", (action.value,))
            self._metric("model_reload_abandoned_loads_total")
            for line in _MODEL_LINES:
                for reload_result in ReloadResult:
                    self._child("model_line_reload_total", (line, reload_result.value))
                for reload_phase in RELOAD_TIMED_PHASES:
                    self._child("model_line_reload_phase_seconds", (line, reload_phase.value))
                for action in DrainTimeoutAction:
                    self._child("model_line_drain_timeout_requests_total", (line, action.value))
                self._child("model_line_reload_abandoned_loads_total", (line,))
        if MetricGroup.LOGGER in self.groups:
            self._metric("rl_logger_push_errors_total")

    def _metric(self, name: str) -> Any:
        try:
            return self._metrics[name]
        except KeyError:
            raise RuntimeError(
                f"metric {name} is not part of this collector (groups: "
                f"{sorted(g.value for g in self.groups)}); build it with the group that owns it"
            ) from None

    def _child(self, name: str, values: tuple[str, ...]) -> Any:
        key = (name, values)
        child = self._children.get(key)
        if child is None:
            child = self._metric(name).labels(*values)
            self._children[key] = child
        return child

    def _vocabulary_child(
        self, name: str, label: str, value: str | Enum, allowed: tuple[str, ...]
    ) -> Any:
        """Child of a one-label metric with a closed vocabulary, validated once per value."""
        key = (name, value)
        child = self._vocabulary_children.get(key)
        if child is None:
            child = self._child(name, (_choice(label, value, allowed),))
            self._vocabulary_children[key] = child
        return child

    def _latency_child(self, mode: str) -> Any:
        return self._child("llm_brief_latency_seconds", (mode,))

    # ------------------------------------------------------------------ LLM briefs

    def record_llm_brief(
        self,
        mode: str | BriefMode,
        success: bool,
        latency_seconds: float,
        repaired: bool = False,
        repair_type: str | RepairType | None = None,
    ) -> None:
        """Record one LLM brief generation.

        Args:
            mode: ``fast``, ``balanced`` or ``creative``.
            success: Whether a valid brief came out.
            latency_seconds: End-to-end latency, >= 0.
            repaired: Whether the answer had to be repaired.
            repair_type: Kind of repair (``RepairType`` or its value; the guide's names in
                ``REPAIR_TYPE_ALIASES`` too); ``other`` when repaired without one.

        Raises:
            ValueError: Unknown mode or repair type, negative or non-finite latency.
        """
        key = (mode, bool(success), bool(repaired), repair_type)
        children = self._brief_children.get(key)
        if children is None:  # first time for these labels: validate, then cache the children
            mode_value = _choice("mode", mode, _BRIEF_MODES)
            repair = None
            if repaired or repair_type is not None:
                repair_value = _choice(
                    "repair_type",
                    repair_type_value(repair_type or RepairType.OTHER),
                    _REPAIR_TYPES_AND_ALIASES,
                )
                repair_value = repair_type_value(repair_value)
                repair = self._child("llm_brief_repairs_total", (mode_value, repair_value))
            status = "success" if success else "failure"
            children = (
                self._child("llm_brief_total", (mode_value, status)),
                self._latency_child(mode_value),
                repair,
            )
        latency = _finite("latency_seconds", latency_seconds, non_negative=True)
        self._brief_children[key] = children
        children[0].inc()
        children[1].observe(latency)
        if children[2] is not None:
            children[2].inc()

    def track_llm_brief(self, mode: str | BriefMode) -> BriefOutcome:
        """Time an LLM brief generation; an exception marks it failed and propagates.

        Example:
            >>> with collector.track_llm_brief("creative") as brief:  # doctest: +SKIP
            ...     answer = llm(prompt)
            ...     if needed_repair:
            ...         brief.mark_repaired("json_syntax")
        """
        return BriefOutcome(self, _choice("mode", mode, _BRIEF_MODES))

    # ------------------------------------------------------------------ RL training

    def record_rl_update(
        self,
        algorithm: str,
        policy_loss: float,
        value_loss: float,
        total_loss: float,
        reward: float,
        entropy: float,
        clip_fraction: float,
        kl_divergence: float | None = None,
    ) -> None:
        """Record one RL update (the guide's signature).

        Raises:
            ValueError: Non-finite value, clip fraction outside [0, 1], malformed algorithm name.
        """
        self.record_rl_metrics(
            algorithm,
            updates=1,
            policy_loss=_finite("policy_loss", policy_loss),
            value_loss=_finite("value_loss", value_loss),
            total_loss=_finite("total_loss", total_loss),
            reward=_finite("reward", reward),
            entropy=_finite("entropy", entropy),
            clip_fraction=_finite("clip_fraction", clip_fraction),
            kl_divergence=None
            if kl_divergence is None
            else _finite("kl_divergence", kl_divergence),
        )

    def record_rl_metrics(
        self,
        algorithm: str | None = None,
        *,
        updates: int = 0,
        step: int | None = None,
        policy_loss: float | None = None,
        value_loss: float | None = None,
        total_loss: float | None = None,
        reward: float | None = None,
        entropy: float | None = None,
        clip_fraction: float | None = None,
        kl_divergence: float | None = None,
    ) -> None:
        """Set whichever RL values are given (the logger's path: a log call carries a subset).

        Non-finite values are exported as they are: a NaN loss must show on the dashboard, and
        ``record_rl_update`` is the strict entry point for direct callers.

        Raises:
            ValueError: Malformed algorithm name, negative ``updates``, clip fraction
                outside [0, 1]. Nothing is recorded then.
        """
        if updates < 0:
            raise ValueError(f"updates must be >= 0, got {updates}")
        if clip_fraction is not None and not in_value_range("rl_clip_fraction", clip_fraction):
            raise ValueError(f"clip_fraction must be in [0, 1], got {clip_fraction}")
        if updates:
            if algorithm is None:
                raise ValueError("algorithm is required when updates > 0 (e.g. 'ppo')")
            if not _ALGORITHM_RE.match(algorithm):
                raise ValueError(
                    f"algorithm {algorithm!r} must be a short lowercase identifier (e.g. 'ppo')"
                )
            self._algorithms.admit(algorithm)
            self._child("rl_update_total", (algorithm,)).inc(updates)
        for loss_type, loss in (
            (LossType.POLICY, policy_loss),
            (LossType.VALUE, value_loss),
            (LossType.TOTAL, total_loss),
        ):
            if loss is not None:
                self._child("rl_loss", (loss_type.value,)).set(loss)
        for name, value in (
            ("rl_reward", reward),
            ("rl_entropy", entropy),
            ("rl_clip_fraction", clip_fraction),
            ("rl_kl_divergence", kl_divergence),
        ):
            if value is not None:
                self._metric(name).set(value)
        if step is not None:
            self._metric("rl_global_step").set(step)
        self._metric("rl_last_update_timestamp_seconds").set(time.time())

    # ------------------------------------------------------------------ API requests

    def _endpoint(self, endpoint: str) -> str:
        if endpoint in self._endpoints.seen:
            return endpoint
        if not endpoint.startswith("/") or any(c in endpoint for c in "?# \t\n"):
            raise ValueError(
                f"endpoint {endpoint!r} must be a route template such as '/dna/create' "
                f"(starting with '/', no query string)"
            )
        for segment in endpoint.split("/"):
            if _RAW_SEGMENT_RE.match(segment):
                raise ValueError(
                    f"endpoint {endpoint!r} looks like a raw path (segment {segment!r}); pass the "
                    f"route template, e.g. '/models/{{version}}', to keep label cardinality bounded"
                )
        with self._lock:
            self._endpoints.admit(endpoint)
        return endpoint

    def record_api_request(
        self, endpoint: str, method: str, status_code: int, latency_seconds: float
    ) -> None:
        """Record one HTTP request.

        Args:
            endpoint: Route template (``/dna/create``), never the raw path.
            method: HTTP method, e.g. ``POST``.
            status_code: HTTP status code, 100-599.
            latency_seconds: Time to the response, >= 0.

        Raises:
            ValueError: Unknown method, status code out of range, raw path, or a new endpoint
                over the cap.
        """
        key = (endpoint, method, status_code)
        children = self._api_children.get(key)
        if children is None:  # first time for these labels: validate, then cache the children
            name = self._endpoint(endpoint)
            verb = _choice("method", method.upper(), HTTP_METHODS)
            if isinstance(status_code, bool) or not 100 <= int(status_code) <= 599:
                raise ValueError(
                    f"status_code must be an HTTP status in 100-599, got {status_code!r}"
                )
            children = (
                self._child("api_request_total", (name, verb, str(int(status_code)))),
                self._child("api_request_latency_seconds", (name, verb)),
            )
        latency = _finite("latency_seconds", latency_seconds, non_negative=True)
        self._api_children[key] = children
        children[0].inc()
        children[1].observe(latency)

    def track_api_request(self, endpoint: str, method: str) -> ApiRequestOutcome:
        """Time a request and count it in flight; an exception without a status counts as 500.

        Example:
            >>> with collector.track_api_request("/dna/create", "POST") as req:  # doctest: +SKIP
            ...     response = handle()
            ...     req.set_status_code(response.status_code)
        """
        verb = _choice("method", method.upper(), HTTP_METHODS)
        return ApiRequestOutcome(self, self._endpoint(endpoint), verb)

    # ------------------------------------------------------------------ checkpoints

    def record_checkpoint_save(
        self, blocking_seconds: float, write_seconds: float | None = None
    ) -> None:
        """Record a committed checkpoint: time the training thread stalled, and the write time."""
        blocking = _finite("blocking_seconds", blocking_seconds, non_negative=True)
        write = None
        if write_seconds is not None:
            write = _finite("write_seconds", write_seconds, non_negative=True)
        self._child("checkpoint_saves_total", ("success",)).inc()
        self._child("checkpoint_save_seconds", ("blocking",)).observe(blocking)
        if write is not None:
            self._child("checkpoint_save_seconds", ("write",)).observe(write)

    def record_checkpoint_error(self) -> None:
        """Record a checkpoint save that failed."""
        self._child("checkpoint_saves_total", ("error",)).inc()

    def record_rollback(self, reason: str | RollbackReason) -> None:
        """Record one rollback.

        Raises:
            ValueError: Reason outside ``RollbackReason`` (the observer maps free text first).
        """
        self._vocabulary_child(
            "checkpoint_rollbacks_total", "reason", reason, _ROLLBACK_REASONS
        ).inc()

    # ------------------------------------------------------------------ model reloads

    def record_model_reload(
        self,
        result: str | ReloadResult,
        phase_seconds: Mapping[str | ReloadPhase, float] | None = None,
    ) -> None:
        """Record the outcome of one hot reload and, optionally, how long each phase took."""
        child = self._vocabulary_child("model_reload_total", "result", result, _RELOAD_RESULTS)
        if phase_seconds:
            for phase, seconds in phase_seconds.items():
                self.record_reload_phase(phase, seconds)
        child.inc()

    def record_reload_phase(self, phase: str | ReloadPhase, seconds: float) -> None:
        """Record the duration of one reload phase."""
        child = self._vocabulary_child("model_reload_phase_seconds", "phase", phase, _RELOAD_PHASES)
        child.observe(_finite("seconds", seconds, non_negative=True))

    @contextmanager
    def track_reload_phase(self, phase: str | ReloadPhase) -> Iterator[None]:
        """Time one reload phase (recorded even when the phase raises)."""
        phase_value = _choice("phase", phase, _RELOAD_PHASES)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record_reload_phase(phase_value, time.perf_counter() - start)

    def record_drain_timeout(self, requests: int, action: str | DrainTimeoutAction) -> None:
        """Count requests that outlived a drain timeout and what was done with them.

        Args:
            requests: How many were still running on the old worker (>= 0).
            action: ``leave_running`` (answered normally) or ``reject`` (answered 503).

        Raises:
            ValueError: Unknown action, or a negative or non-integer count.
        """
        child = self._vocabulary_child(
            "model_reload_drain_timeout_requests_total", "action", action, _DRAIN_ACTIONS
        )
        if isinstance(requests, bool) or not isinstance(requests, int) or requests < 0:
            raise ValueError(f"requests must be an integer >= 0, got {requests!r}")
        child.inc(requests)

    def record_abandoned_load(self) -> None:
        """Count a model load abandoned past its deadline (its thread runs on, ignored)."""
        self._metric("model_reload_abandoned_loads_total").inc()

    def set_model_version(self, version: str, role: str | ModelRole = ModelRole.CURRENT) -> None:
        """Mark ``version`` as holding ``role``; its other role (if any) drops to 0."""
        role_value = _choice("role", role, _MODEL_ROLES)
        if not _VERSION_RE.match(version):
            raise ValueError(
                f"version {version!r} must be 1-128 characters of letters, digits, '.', '_', '-'"
            )
        with self._lock:
            self._versions.admit(version)
            previous = self._model_roles.get(version)
            if previous is not None and previous != role_value:
                self._child("model_info", (previous, version)).set(0)
            self._model_roles[version] = role_value
        self._child("model_info", (role_value, version)).set(1)

    def record_line_reload(self, model: str | ModelLine, result: str | ReloadResult) -> None:
        """Count one reload of model line ``model`` in ``model_line_reload_total``."""
        labels = (_choice("model", model, _MODEL_LINES), _choice("result", result, _RELOAD_RESULTS))
        self._child("model_line_reload_total", labels).inc()

    def record_line_reload_phase(
        self, model: str | ModelLine, phase: str | ReloadPhase, seconds: float
    ) -> None:
        """Observe one reload phase of line ``model`` (``model_line_reload_phase_seconds``)."""
        labels = (_choice("model", model, _MODEL_LINES), _choice("phase", phase, _RELOAD_PHASES))
        self._child("model_line_reload_phase_seconds", labels).observe(
            _finite("seconds", seconds, non_negative=True)
        )

    def record_line_drain_timeout(
        self, model: str | ModelLine, requests: int, action: str | DrainTimeoutAction
    ) -> None:
        """Count requests of line ``model`` that outlived a drain timeout, by what was done
        (``model_line_drain_timeout_requests_total``).

        Raises:
            ValueError: Unknown line or action, or a negative or non-integer count.
        """
        labels = (_choice("model", model, _MODEL_LINES), _choice("action", action, _DRAIN_ACTIONS))
        if isinstance(requests, bool) or not isinstance(requests, int) or requests < 0:
            raise ValueError(f"requests must be an integer >= 0, got {requests!r}")
        self._child("model_line_drain_timeout_requests_total", labels).inc(requests)

    def record_line_abandoned_load(self, model: str | ModelLine) -> None:
        """Count a load of line ``model`` abandoned past its deadline
        (``model_line_reload_abandoned_loads_total``)."""
        line = _choice("model", model, _MODEL_LINES)
        self._child("model_line_reload_abandoned_loads_total", (line,)).inc()

    def set_line_version(
        self, model: str | ModelLine, version: str, role: str | ModelRole = ModelRole.CURRENT
    ) -> None:
        """Mark ``version`` of model line ``model`` as holding ``role`` (``model_line_info``);
        its other role in that line (if any) drops to 0."""
        line = _choice("model", model, _MODEL_LINES)
        role_value = _choice("role", role, _MODEL_ROLES)
        if not _VERSION_RE.match(version):
            raise ValueError(
                f"version {version!r} must be 1-128 characters of letters, digits, '.', '_', '-'"
            )
        with self._lock:
            self._versions.admit(version)
            previous = self._line_roles.get((line, version))
            if previous is not None and previous != role_value:
                self._child("model_line_info", (line, previous, version)).set(0)
            self._line_roles[(line, version)] = role_value
        self._child("model_line_info", (line, role_value, version)).set(1)

    def retire_line_version(self, model: str | ModelLine, version: str) -> None:
        """``version`` left model line ``model`` in this process: its series stay, at 0."""
        line = _choice("model", model, _MODEL_LINES)
        with self._lock:
            role = self._line_roles.pop((line, version), None)
        if role is not None:
            self._child("model_line_info", (line, role, version)).set(0)

    def retire_model_version(self, version: str) -> None:
        """The version left this process: its series stay, at 0 (multiprocess cannot remove)."""
        with self._lock:
            role = self._model_roles.pop(version, None)
        if role is not None:
            self._child("model_info", (role, version)).set(0)

    # ------------------------------------------------------------------ logger bookkeeping

    def record_push_error(self) -> None:
        """Count one failed push of the training logger."""
        self._metric("rl_logger_push_errors_total").inc()

    def record_dropped_value(self, key: str, reason: str | DroppedValueReason) -> None:
        """Count one logged value the training logger dropped (``key`` is capped by the caller).

        Raises:
            ValueError: A reason outside ``DroppedValueReason``.
        """
        reason_value = _choice("reason", reason, _DROP_REASONS)
        self._child("rl_logger_dropped_values_total", (key, reason_value)).inc()

    def set_guard_threshold(self, threshold: str | GuardThreshold, value: float) -> None:
        """Publish one configured threshold of the rollback guard (``rl_guard_threshold``).

        Raises:
            ValueError: A threshold name outside ``GuardThreshold`` or a non-finite value.
        """
        child = self._vocabulary_child(
            "rl_guard_threshold", "threshold", threshold, _GUARD_THRESHOLDS
        )
        child.set(_finite(f"guard threshold {threshold}", value))

    def set_run_info(self, labels: Mapping[str, str]) -> None:
        """Export run metadata (hyperparameters) as ``rl_run_info{...} 1``.

        A gauge, not an ``Info``: multiprocess mode exports no ``Info``. Label names must already
        be valid Prometheus label names (the logger sanitises them); calling again replaces the
        previous label set.

        Raises:
            ValueError: A label name that Prometheus rejects.
        """
        item = spec("rl_run_info")
        if item.group not in self.groups:
            raise RuntimeError(f"rl_run_info needs the {item.group.value} group in this collector")
        names = tuple(labels)
        for name in names:
            if not _LABEL_NAME_RE.match(name) or name.startswith("__"):
                raise ValueError(
                    f"label name {name!r} must match [a-zA-Z_][a-zA-Z0-9_]* without a '__' prefix"
                )
        with self._lock:
            previous = self._metrics.pop(item.name, None)
            if previous is not None:
                self.registry.unregister(previous)
            gauge = self._create(item, names)
            self._metrics[item.name] = gauge
        (gauge.labels(*labels.values()) if names else gauge).set(1)

    # ------------------------------------------------------------------ exposition

    @property
    def content_type(self) -> str:
        """``Content-Type`` of ``exposition()``."""
        return CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        """Text exposition for ``GET /metrics``; merges all workers' files in multiprocess mode."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged)


def _enum_values(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(str(member.value) for member in enum)


_BRIEF_MODES = _enum_values(BriefMode)
_REPAIR_TYPES = _enum_values(RepairType)
_REPAIR_TYPES_AND_ALIASES = _REPAIR_TYPES + tuple(REPAIR_TYPE_ALIASES)
_DROP_REASONS = _enum_values(DroppedValueReason)
_GUARD_THRESHOLDS = _enum_values(GuardThreshold)


def in_value_range(name: str, value: float) -> bool:
    """Whether ``value`` fits the catalogued ``value_range`` of metric ``name``.

    Non-finite values always fit: a NaN must reach the dashboard (the guard acts on it).
    """
    bounds = spec(name).value_range
    if bounds is None or not math.isfinite(value):
        return True
    return bounds[0] <= value <= bounds[1]


_ROLLBACK_REASONS = _enum_values(RollbackReason)
_RELOAD_RESULTS = _enum_values(ReloadResult)
_RELOAD_PHASES = tuple(phase.value for phase in RELOAD_TIMED_PHASES)
_MODEL_ROLES = _enum_values(ModelRole)
_MODEL_LINES = _enum_values(ModelLine)
_DRAIN_ACTIONS = _enum_values(DrainTimeoutAction)
