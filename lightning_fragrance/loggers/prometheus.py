"""`PrometheusLogger`: a Lightning logger that exports training metrics to Prometheus.

Logged keys are mapped onto the ``rl_*`` metrics of the catalogue (``train/reward`` ->
``rl_reward``, ``train/policy_loss`` -> ``rl_loss{type="policy"}``...), hyperparameters become
``rl_run_info``, and the registry is pushed to a Pushgateway by a background thread at most once
per ``push_interval`` plus once in ``finalize``. Without a gateway the logger serves ``/metrics``
on 127.0.0.1 for Prometheus to scrape.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from argparse import Namespace
from collections.abc import Callable, Mapping
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from prometheus_client import CollectorRegistry, Gauge, delete_from_gateway, push_to_gateway
from prometheus_client.exposition import start_http_server

from lightning_fragrance.loggers.push_deadline import deadline_handler
from lightning_fragrance.monitoring.checkpoint_observer import PrometheusCheckpointObserver
from lightning_fragrance.monitoring.collector import OperationsMetricsCollector, in_value_range
from lightning_fragrance.monitoring.metrics import CATALOGUE, DroppedValueReason, MetricGroup

log = logging.getLogger(__name__)

DROP = "drop"
# The ``key`` label of ``rl_logger_dropped_values_total`` once ``max_unknown_metrics`` distinct
# keys have been dropped: a loop logging ever-new keys must not create ever-new series.
OTHER_KEYS = "_other_keys"
# A dropped key is warned about at most once per this many seconds (the counter has every drop).
DROP_WARNING_INTERVAL_S = 60.0

# Targets a logged key can map to, and the collector argument each one sets.
_TARGETS: Mapping[str, str] = {
    'rl_loss{type="policy"}': "policy_loss",
    'rl_loss{type="value"}': "value_loss",
    'rl_loss{type="total"}': "total_loss",
    "rl_reward": "reward",
    "rl_entropy": "entropy",
    "rl_clip_fraction": "clip_fraction",
    "rl_kl_divergence": "kl_divergence",
}

# Catalogued metric behind each target, whose value_range a value must fit.
_TARGET_METRICS: Mapping[str, str] = {target: target.split("{")[0] for target in _TARGETS}

DEFAULT_METRIC_MAP: Mapping[str, str] = {
    "train/policy_loss": 'rl_loss{type="policy"}',
    "train/value_loss": 'rl_loss{type="value"}',
    "train/loss": 'rl_loss{type="total"}',
    "train/total_loss": 'rl_loss{type="total"}',
    "train/reward": "rl_reward",
    "train/entropy": "rl_entropy",
    "train/clip_fraction": "rl_clip_fraction",
    "train/kl": "rl_kl_divergence",
    "train/approx_kl": "rl_kl_divergence",
    "train/kl_divergence": "rl_kl_divergence",
    # Lightning injects the epoch into nearly every call (research note §1): not a metric.
    "epoch": DROP,
}

_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]+")


def _canonical_target(target: str) -> str:
    """Accept ``rl_loss{type=policy}`` as well as ``rl_loss{type="policy"}``."""
    text = target.strip().replace(" ", "").replace("'", '"')
    match = re.fullmatch(r"rl_loss\{type=\"?(\w+)\"?\}", text)
    return f'rl_loss{{type="{match.group(1)}"}}' if match else text


def sanitise_metric_name(key: str, prefix: str) -> str:
    """Turn a logged key into a legal Prometheus name: ``val/loss@1`` -> ``{prefix}val_loss_1``."""
    body = _NAME_CHARS.sub("_", key).strip("_")
    return f"{prefix}{body}" if body else f"{prefix}unnamed"


def _as_float(raw: object) -> float | None:
    """``raw`` as a float, or None when it is not a number (a string, a multi-element tensor)."""
    try:
        return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: torch, tensor of many values
        return None


def _flatten(params: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}/{key}" if parent else str(key)
        if isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


class _BackgroundPusher:
    """One daemon thread that runs pushes in order; requests made while one runs coalesce.

    The training thread only sets a flag, so a gateway that hangs costs it nothing; the push
    itself is bounded by a total deadline of ``push_timeout`` seconds (``push_deadline``): a hung
    or trickling gateway holds it that long at most (the client's default would be 30 s per
    read: research note §0).
    """

    def __init__(self, push: Callable[[], None], name: str) -> None:
        self._push = push
        self._cond = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def request(self) -> int:
        with self._cond:
            self._requested += 1
            self._cond.notify()
            return self._requested

    def wait(self, ticket: int, timeout: float) -> bool:
        """Wait until the push of ``ticket`` (or a later one) ran; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._completed < ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._requested == self._completed and not self._closing:
                    self._cond.wait()
                if self._requested == self._completed:
                    return
                target = self._requested
            self._push()  # never raises: errors are handled by the push callable
            with self._cond:
                self._completed = target
                self._cond.notify_all()


class PrometheusLogger(Logger):
    """Export Lightning-logged training metrics to Prometheus (Pushgateway or scrape).

    Args:
        pushgateway_url: ``host:port`` or URL of a Pushgateway. ``None`` serves ``/metrics`` on
            ``http_host:http_port`` instead.
        job: ``job`` label of the pushed group (and the logger's ``name``).
        run_id: ``run_id`` grouping label (and the logger's ``version``); default: time + random.
        push_interval: Minimum seconds between two pushes while training. A push costs ~2 ms
            (research note §0) and Lightning logs every few steps, so pushes are throttled.
        push_timeout: Total deadline of a push or delete, seconds: connect, send and the whole
            answer. A socket timeout alone lets a gateway trickling a byte a second hold a push
            forever without an error; past the deadline the push counts as failed.
        algorithm: ``algorithm`` label of ``rl_update_total``.
        metric_map: Logged key -> target (``rl_reward``, ``rl_loss{type=policy}``... or ``drop``),
            merged over ``DEFAULT_METRIC_MAP`` unless ``use_default_map`` is False. A key logged
            with Lightning's ``_step`` suffix uses the mapping of the key without it.
        use_default_map: Start from ``DEFAULT_METRIC_MAP``.
        unknown_keys: ``"gauge"``: a key without a mapping becomes a gauge named
            ``unknown_prefix`` + the sanitised key; ``"drop"``: it is ignored.
        unknown_prefix: Name prefix of those gauges.
        max_unknown_metrics: Cap on such gauges (each is a series in Prometheus); later ones drop.
        max_hparams: Cap on hyperparameters exported as ``rl_run_info`` labels.
        delete_on_finish: Delete the pushed group from the gateway in ``finalize``.
        all_ranks: Export from every rank (each pushes its own ``rank`` group); default rank 0.
        http_host: Address of the ``/metrics`` server when no gateway is configured.
        http_port: Its port; 0 picks a free one (see ``metrics_url``).

    Raises:
        ValueError: An unknown mapping target or option value (the message lists the allowed).
    """

    def __init__(
        self,
        pushgateway_url: str | None = None,
        job: str = "lightning_fragrance",
        run_id: str | None = None,
        push_interval: float = 15.0,
        push_timeout: float = 2.0,
        algorithm: str = "ppo",
        metric_map: Mapping[str, str] | None = None,
        use_default_map: bool = True,
        unknown_keys: Literal["gauge", "drop"] = "gauge",
        unknown_prefix: str = "rl_metric_",
        max_unknown_metrics: int = 100,
        max_hparams: int = 32,
        delete_on_finish: bool = False,
        all_ranks: bool = False,
        http_host: str = "127.0.0.1",
        http_port: int = 0,
    ) -> None:
        super().__init__()
        if unknown_keys not in ("gauge", "drop"):
            raise ValueError(f"unknown_keys must be 'gauge' or 'drop', got {unknown_keys!r}")
        if push_interval < 0 or push_timeout <= 0:
            raise ValueError(
                f"push_interval must be >= 0 and push_timeout > 0 seconds, got "
                f"{push_interval} and {push_timeout}"
            )
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", unknown_prefix):
            raise ValueError(f"unknown_prefix {unknown_prefix!r} must be a valid metric name start")
        if unknown_prefix.rstrip("_") in {name.rstrip("_") for name in CATALOGUE}:
            raise ValueError(f"unknown_prefix {unknown_prefix!r} collides with a catalogued metric")
        self._map = self._resolve_map(metric_map, use_default_map)
        self.pushgateway_url = pushgateway_url or None
        self._job = job
        self._run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.push_interval = float(push_interval)
        self.push_timeout = float(push_timeout)
        self.algorithm = algorithm
        self.unknown_keys = unknown_keys
        self.unknown_prefix = unknown_prefix
        self.max_unknown_metrics = max_unknown_metrics
        self.max_hparams = max_hparams
        self.delete_on_finish = delete_on_finish
        self.all_ranks = all_ranks
        self.http_host = http_host
        self.http_port = http_port

        self.registry = CollectorRegistry()
        self.collector = OperationsMetricsCollector(
            self.registry,
            groups=frozenset({MetricGroup.RL, MetricGroup.CHECKPOINT, MetricGroup.LOGGER}),
        )
        self._unknown: dict[str, Gauge] = {}
        self._unknown_by_name: dict[str, Gauge] = {}
        self._dropped_keys: set[str] = set()
        self._drop_warned_at: dict[str, float] = {}
        self._drops_since_warning: dict[str, int] = {}
        self._server_failed = False
        self._updates_seen = 0
        self._last_push_request = -math.inf
        self._last_error_log = -math.inf
        self._pusher: _BackgroundPusher | None = None
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._finalized = False
        self._lock = threading.Lock()
        self.pushes_done = 0

    # ------------------------------------------------------------------ Logger contract

    @property
    def name(self) -> str:
        """The ``job`` label."""
        return self._job

    @property
    def version(self) -> str:
        """The ``run_id`` grouping label."""
        return self._run_id

    @property
    def rank(self) -> int:
        """Global rank of this process, as Lightning set it."""
        return int(getattr(rank_zero_only, "rank", 0) or 0)

    @property
    def grouping_key(self) -> dict[str, str]:
        """Pushgateway grouping key (with ``job``): run id and rank."""
        return {"run_id": self._run_id, "rank": str(self.rank)}

    @property
    @rank_zero_experiment
    def experiment(self) -> OperationsMetricsCollector:
        """The collector the logger writes through (a no-op dummy on non-zero ranks)."""
        return self.collector

    @property
    def checkpoint_observer(self) -> PrometheusCheckpointObserver:
        """Observer for ``RollbackCheckpoint(observers=[...])``: saves and rollbacks get pushed."""
        return PrometheusCheckpointObserver(self.collector)

    @property
    def metrics_url(self) -> str | None:
        """URL of the embedded ``/metrics`` server, once started (no gateway configured)."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else host
        return f"http://{host_text}:{port}/metrics"

    def log_hyperparams(
        self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        """Export hyperparameters as ``rl_run_info{...} 1`` (sanitised, truncated, capped)."""
        if not self._active():
            return
        raw = vars(params) if isinstance(params, Namespace) else dict(params or {})
        labels: dict[str, str] = {}
        flat = _flatten(raw)
        for key, value in sorted(flat.items()):
            label = _NAME_CHARS.sub("_", key).strip("_") or "param"
            if label[0].isdigit():
                label = f"p_{label}"
            label = label.lstrip("_") or "param"
            if label in labels or label in ("job", "run_id", "rank", "instance"):
                continue
            if len(labels) >= self.max_hparams:
                log.warning(
                    "rl_run_info keeps the first %d hyperparameters (max_hparams); %d more dropped",
                    self.max_hparams,
                    len(flat) - self.max_hparams,
                )
                break
            labels[label] = str(value)[:100]  # every distinct value is a new series
        self.collector.set_run_info(labels)
        self._ensure_started()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Map the logged values onto the metrics; request a push when the interval elapsed.

        Never raises: a value its metric cannot take (a clip fraction of 1.0000001, a string)
        is dropped, counted in ``rl_logger_dropped_values_total{key, reason}`` and warned about
        at most once a minute per key. A metrics hiccup must not abort ``Trainer.fit``.
        """
        if not self._active():
            return
        values: dict[str, float] = {}
        logged_as: dict[str, str] = {}  # collector argument -> the key it came from
        for key, raw in metrics.items():
            target = self._target(key)
            if target == DROP:
                continue
            value = _as_float(raw)
            if value is None:
                self._drop(key, DroppedValueReason.NOT_A_NUMBER, raw)
            elif target is None:
                if self.unknown_keys == "gauge":
                    self._set_unknown(key, value)
            elif not in_value_range(_TARGET_METRICS[target], value):
                self._drop(key, DroppedValueReason.OUT_OF_RANGE, value)
            else:
                values[_TARGETS[target]] = value
                logged_as[_TARGETS[target]] = key
        updates = 1
        if step is not None:
            updates = max(0, step + 1 - self._updates_seen)
            self._updates_seen = max(self._updates_seen, step + 1)
        if values or updates:
            self._record(values, logged_as, updates, step)
        self._ensure_started()
        now = time.monotonic()
        if self._pusher is not None and now - self._last_push_request >= self.push_interval:
            self._last_push_request = now
            self._pusher.request()

    def save(self) -> None:
        """No-op: Lightning calls it after every ``log_metrics``; pushing here doubles pushes."""

    def finalize(self, status: str) -> None:
        """Final push (bounded by ``push_timeout``), optional group delete, stop the threads."""
        if self._finalized or not self._active():
            return
        self._finalized = True
        if self._pusher is not None:
            ticket = self._pusher.request()
            # Bounded: a hung push in flight plus ours, each at most push_timeout.
            self._pusher.wait(ticket, 2 * self.push_timeout + 0.5)
            if self.delete_on_finish:
                self._delete_group()
            self._pusher.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        log.info("PrometheusLogger finished (%s): %d pushes", status, self.pushes_done)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _resolve_map(metric_map: Mapping[str, str] | None, use_default: bool) -> dict[str, str]:
        merged = dict(DEFAULT_METRIC_MAP) if use_default else {}
        for key, target in (metric_map or {}).items():
            canonical = DROP if str(target).strip() == DROP else _canonical_target(str(target))
            if canonical != DROP and canonical not in _TARGETS:
                allowed = ", ".join([*_TARGETS, DROP])
                raise ValueError(
                    f"metric_map[{key!r}] = {target!r} is not a known target; allowed: {allowed}"
                )
            merged[str(key)] = canonical
        return merged

    def _active(self) -> bool:
        return self.all_ranks or self.rank == 0

    def _target(self, key: str) -> str | None:
        """Mapping target of a logged key; Lightning's ``_step`` suffix maps like the bare key."""
        target = self._map.get(key)
        if target is None and key.endswith("_step"):
            target = self._map.get(key[: -len("_step")])
        return target

    def _record(
        self, values: dict[str, float], logged_as: dict[str, str], updates: int, step: int | None
    ) -> None:
        try:
            self.collector.record_rl_metrics(self.algorithm, updates=updates, step=step, **values)
        except (ValueError, RuntimeError) as exc:  # e.g. a malformed algorithm name
            for argument in values:
                self._drop(logged_as[argument], DroppedValueReason.REJECTED, exc)
            if not values:
                self._drop("rl_update_total", DroppedValueReason.REJECTED, exc)

    def _drop(self, key: str, reason: DroppedValueReason, value: object) -> None:
        """Count a dropped value under its key (capped) and warn at most once a minute per key."""
        label = key
        if key not in self._dropped_keys:
            if len(self._dropped_keys) >= self.max_unknown_metrics:
                label = OTHER_KEYS
            else:
                self._dropped_keys.add(key)
        self.collector.record_dropped_value(label, reason)
        self._drops_since_warning[key] = self._drops_since_warning.get(key, 0) + 1
        now = time.monotonic()
        if now - self._drop_warned_at.get(key, -math.inf) < DROP_WARNING_INTERVAL_S:
            return
        self._drop_warned_at[key] = now
        count = self._drops_since_warning.pop(key)
        log.warning(
            "PrometheusLogger dropped %r = %.200r (%s%s); %d such value(s) since the last warning, "
            "all counted in rl_logger_dropped_values_total; training continues",
            key,
            value,
            reason.value,
            self._drop_hint(key, reason),
            count,
        )

    def _drop_hint(self, key: str, reason: DroppedValueReason) -> str:
        target = self._target(key)
        if reason is DroppedValueReason.OUT_OF_RANGE and target is not None:
            metric = _TARGET_METRICS[target]
            low, high = CATALOGUE[metric].value_range or (-math.inf, math.inf)
            return f": {metric} takes values in [{low:g}, {high:g}]"
        if reason is DroppedValueReason.OVER_CAP:
            return f": max_unknown_metrics={self.max_unknown_metrics} reached; use metric_map"
        return ""

    def _set_unknown(self, key: str, value: float) -> None:
        gauge = self._unknown.get(key)
        if gauge is None:
            if len(self._unknown) >= self.max_unknown_metrics:
                self._drop(key, DroppedValueReason.OVER_CAP, value)
                return
            name = sanitise_metric_name(key, self.unknown_prefix)
            gauge = self._unknown_by_name.get(name)
            if gauge is None:  # "a/b" and "a_b" sanitise alike: they share one gauge
                gauge = Gauge(name, f"Value logged under {key!r}.", registry=self.registry)
                self._unknown_by_name[name] = gauge
            self._unknown[key] = gauge
        gauge.set(value)

    def _ensure_started(self) -> None:
        with self._lock:
            if self._finalized:
                return
            if self.pushgateway_url:
                if self._pusher is None:
                    self._pusher = _BackgroundPusher(self._push, f"prometheus-push-{self._run_id}")
            elif self._server is None and not self._server_failed:
                try:
                    self._server, self._server_thread = start_http_server(
                        self.http_port, addr=self.http_host, registry=self.registry
                    )
                except OSError as exc:  # the port is taken: training goes on without /metrics
                    self._server_failed = True
                    log.error(
                        "PrometheusLogger could not serve /metrics on %s:%d (%s); training "
                        "continues without it: pick a free http_port (0 = any)",
                        self.http_host,
                        self.http_port,
                        exc,
                    )
                    return
                log.info("PrometheusLogger serving %s", self.metrics_url)

    def _push(self) -> None:
        assert self.pushgateway_url is not None
        try:
            push_to_gateway(
                self.pushgateway_url,
                job=self._job,
                registry=self.registry,
                grouping_key=self.grouping_key,
                timeout=self.push_timeout,
                handler=deadline_handler(self.push_timeout),
            )
            self.pushes_done += 1
        except Exception as exc:
            self._count_error("push", exc)

    def _delete_group(self) -> None:
        assert self.pushgateway_url is not None
        done = threading.Event()

        def delete() -> None:
            try:
                delete_from_gateway(
                    self.pushgateway_url or "",
                    job=self._job,
                    grouping_key=self.grouping_key,
                    timeout=self.push_timeout,
                    handler=deadline_handler(self.push_timeout),
                )
            except Exception as exc:
                self._count_error("delete", exc)
            finally:
                done.set()

        threading.Thread(target=delete, name="prometheus-delete", daemon=True).start()
        done.wait(self.push_timeout + 0.5)

    def _count_error(self, what: str, exc: BaseException) -> None:
        self.collector.record_push_error()
        now = time.monotonic()
        if now - self._last_error_log >= 60.0:  # one warning a minute, not one per push
            self._last_error_log = now
            log.warning(
                "Prometheus %s to %s failed (%s: %s); training continues, %d errors so far",
                what,
                self.pushgateway_url,
                type(exc).__name__,
                exc,
                int(self.push_errors),
            )

    @property
    def push_errors(self) -> float:
        """Failed pushes and deletes so far."""
        return self.registry.get_sample_value("rl_logger_push_errors_total") or 0.0
