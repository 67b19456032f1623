"""The one catalogue of metrics (DESIGN.md §6): name, type, help, labels, buckets, vocabularies.

Everything that exports or reads a metric uses this module: the collector builds its
prometheus_client objects from it, the Lightning logger maps logged keys onto it, the dashboard
generator checks every panel against it and the tests check the alert rules against it. Change a
name or a bucket here and nothing else needs editing by hand (the dashboard is regenerated with
``python -m lightning_fragrance.monitoring.dashboard``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum

from lightning_fragrance.labels import (
    DrainTimeoutAction,
    ModelRole,
    ReloadPhase,
    ReloadResult,
    RollbackReason,
)


class MetricType(str, Enum):
    """Prometheus metric types used by the catalogue."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class MetricGroup(str, Enum):
    """Which part of the system writes a metric.

    A collector is built for some groups only: the training logger pushes the RL, checkpoint and
    logger groups, and must not push zero-valued serving series from a training job.
    """

    LLM = "llm"
    API = "api"
    RL = "rl"
    CHECKPOINT = "checkpoint"
    RELOAD = "reload"
    LOGGER = "logger"


class BriefMode(str, Enum):
    """Generation modes of the LLM brief, each with its own p95 latency objective."""

    FAST = "fast"
    BALANCED = "balanced"
    CREATIVE = "creative"


class ModelLine(str, Enum):
    """A model line of a serving process: its own versions, reloads and ``CURRENT``.

    The ``model`` label of the ``model_line_*`` metrics (the ``model_*`` metrics without it are
    the policy line's, as before the brief LLM got a line of its own).
    """

    POLICY = "policy"
    BRIEF_LLM = "brief_llm"


class RepairType(str, Enum):
    """How an LLM answer had to be repaired before it became a valid brief.

    The one vocabulary of ``llm_brief_repairs_total{repair_type}``: the serving brief stage's
    classifier (``lightning_fragrance.serving.brief.classify_repairs``) returns these members,
    so what it names is what the metric counts. A closed enum keeps the label bounded
    (13 values x 3 modes = 39 series); a defect no class explains is ``json_syntax``.
    """

    # Defects of the JSON text, most severe first (the brief stage counts the first one found).
    TRUNCATED = "truncated"  # the answer stopped before the object closed
    SINGLE_QUOTES = "single_quotes"  # {'a': 'b'}
    UNQUOTED_KEYS = "unquoted_keys"  # {a: 1}
    TRAILING_COMMA = "trailing_comma"  # {"a": 1,}
    PYTHON_LITERALS = "python_literals"  # True / False / None
    COMMENTS = "comments"  # // or /* */ inside the object
    CODE_FENCE = "code_fence"  # ```json ... ``` around the object
    SURROUNDING_TEXT = "surrounding_text"  # prose before or after the object
    JSON_SYNTAX = "json_syntax"  # json-repair fixed a syntax defect none of the above explains
    # Defects of the content, and the last resort.
    MISSING_FIELDS = "missing_fields"  # required fields filled with defaults
    INVALID_VALUES = "invalid_values"  # out-of-range values clamped or replaced
    RULE_FALLBACK = "rule_fallback"  # the LLM answer was unusable: rule-based parser used
    OTHER = "other"  # repaired, but the caller gave no type


# The operations guide's own names for some repair types: its literal calls
# (``tracker.mark_repaired("code_block")``) are accepted, and the metric always carries the
# catalogue's value, so the label stays one vocabulary. ``trailing_comma`` already matches.
REPAIR_TYPE_ALIASES: Mapping[str, RepairType] = {
    "code_block": RepairType.CODE_FENCE,
}


def repair_type_value(repair_type: str | RepairType) -> str:
    """The catalogue value of a repair type given as a member, a value or a guide alias.

    Unknown names are returned unchanged, for the recorder to refuse with the allowed values.
    """
    if isinstance(repair_type, RepairType):
        return repair_type.value
    alias = REPAIR_TYPE_ALIASES.get(repair_type)
    return alias.value if alias is not None else repair_type


class DroppedValueReason(str, Enum):
    """Why the training logger dropped a logged value (``rl_logger_dropped_values_total``).

    ``log_metrics`` never raises: a value a metric cannot take is dropped, counted and warned
    about, because a metrics hiccup must not abort ``Trainer.fit`` (issue 10, item 13).
    """

    OUT_OF_RANGE = "out_of_range"  # outside the metric's value_range (clip fraction 1.0000001)
    NOT_A_NUMBER = "not_a_number"  # the value does not convert to a float
    OVER_CAP = "over_cap"  # an unmapped key past max_unknown_metrics
    REJECTED = "rejected"  # the collector refused it for another reason


class GuardThreshold(str, Enum):
    """The rollback guard's thresholds published as ``rl_guard_threshold{threshold}``.

    The names of the guard's own settings (``RollbackConditions``), so an alert compares a
    value with the threshold the run was configured with, not a constant (issue 10, item 15).
    """

    KL = "kl_threshold"
    LOSS_INCREASE_MULTIPLIER = "loss_increase_multiplier"
    REWARD_DROP = "reward_drop_threshold"


RELOAD_TIMED_PHASES: tuple[ReloadPhase, ...] = tuple(
    phase for phase in ReloadPhase if phase is not ReloadPhase.FAILED
)


class LossType(str, Enum):
    """Label values of ``rl_loss{type}``; never ``sum()`` over type: total includes the parts."""

    POLICY = "policy"
    VALUE = "value"
    TOTAL = "total"


BRIEF_STATUSES: tuple[str, ...] = ("success", "failure")
SAVE_RESULTS: tuple[str, ...] = ("success", "error")
SAVE_PHASES: tuple[str, ...] = ("blocking", "write")
HTTP_METHODS: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")

# Per-mode p95 objectives of the operations guide. The LLM latency buckets below have an edge at
# each, so histogram_quantile() is exact at the threshold instead of interpolating across a wide
# bucket (research note §3: a 5 -> 7.5 bucket turned a true p95 of 5.35 s into 5.9 s).
BRIEF_P95_OBJECTIVE_SECONDS: Mapping[BriefMode, float] = {
    BriefMode.FAST: 2.5,
    BriefMode.BALANCED: 3.2,
    BriefMode.CREATIVE: 4.5,
}
API_P95_OBJECTIVE_SECONDS = 2.5

LLM_LATENCY_BUCKETS: tuple[float, ...] = (
    0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.2, 4.0, 4.5, 5.0, 6.0, 7.5, 10.0, 15.0, 30.0, 60.0,
)  # fmt: skip
API_LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
CHECKPOINT_SAVE_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
RELOAD_PHASE_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip


@dataclass(frozen=True)
class MetricSpec:
    """Definition of one metric.

    Args:
        name: Prometheus name as exposed (counters include ``_total``).
        type: Counter, gauge or histogram.
        help: One sentence for ``# HELP``.
        group: Which part of the system writes it.
        labels: Label names, in the order recorders pass them.
        allowed: Closed vocabularies per label; a label not listed here is validated by its
            recorder (route templates, versions, worker ids) and bounded by a cap.
        buckets: Histogram bucket upper bounds (``+Inf`` is implied).
        multiprocess_mode: How gauges aggregate across processes in multiprocess mode.
        dynamic_labels: Label names are only known at run time (``rl_run_info``).
        value_range: Closed interval a value must lie in (None: any); non-finite values are
            exported as they are (a NaN loss must show on the dashboard).
    """

    name: str
    type: MetricType
    help: str
    group: MetricGroup
    labels: tuple[str, ...] = ()
    allowed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    buckets: tuple[float, ...] | None = None
    multiprocess_mode: str = "all"
    dynamic_labels: bool = False
    value_range: tuple[float, float] | None = None

    @property
    def base_name(self) -> str:
        """Name to give prometheus_client, which appends ``_total`` to counters itself."""
        if self.type is MetricType.COUNTER and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        return self.name

    @property
    def series_names(self) -> tuple[str, ...]:
        """Every sample name this metric exposes (what PromQL can select)."""
        if self.type is MetricType.HISTOGRAM:
            return tuple(f"{self.name}_{s}" for s in ("bucket", "sum", "count"))
        return (self.name,)


def _values(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(str(member.value) for member in enum)


_CATALOGUE: tuple[MetricSpec, ...] = (
    MetricSpec(
        "llm_brief_total",
        MetricType.COUNTER,
        "LLM brief generations by mode and outcome.",
        MetricGroup.LLM,
        ("mode", "status"),
        {"mode": _values(BriefMode), "status": BRIEF_STATUSES},
    ),
    MetricSpec(
        "llm_brief_repairs_total",
        MetricType.COUNTER,
        "LLM answers that had to be repaired before they became a valid brief.",
        MetricGroup.LLM,
        ("mode", "repair_type"),
        {"mode": _values(BriefMode), "repair_type": _values(RepairType)},
    ),
    MetricSpec(
        "llm_brief_latency_seconds",
        MetricType.HISTOGRAM,
        "End-to-end latency of one LLM brief generation.",
        MetricGroup.LLM,
        ("mode",),
        {"mode": _values(BriefMode)},
        buckets=LLM_LATENCY_BUCKETS,
    ),
    MetricSpec(
        "rl_update_total",
        MetricType.COUNTER,
        "RL optimisation updates performed.",
        MetricGroup.RL,
        ("algorithm",),
    ),
    MetricSpec(
        "rl_loss",
        MetricType.GAUGE,
        "Latest RL loss by type (total includes the parts: never sum over type).",
        MetricGroup.RL,
        ("type",),
        {"type": _values(LossType)},
        multiprocess_mode="mostrecent",
    ),
    MetricSpec(
        "rl_reward",
        MetricType.GAUGE,
        "Latest mean episode reward.",
        MetricGroup.RL,
        multiprocess_mode="mostrecent",
    ),
    MetricSpec(
        "rl_entropy",
        MetricType.GAUGE,
        "Latest policy entropy.",
        MetricGroup.RL,
        multiprocess_mode="mostrecent",
    ),
    MetricSpec(
        "rl_clip_fraction",
        MetricType.GAUGE,
        "Latest fraction of PPO ratios that were clipped (0-1).",
        MetricGroup.RL,
        multiprocess_mode="mostrecent",
        value_range=(0.0, 1.0),
    ),
    MetricSpec(
        "rl_kl_divergence",
        MetricType.GAUGE,
        "Latest approximate KL divergence between the old and the new policy.",
        MetricGroup.RL,
        multiprocess_mode="mostrecent",
    ),
    MetricSpec(
        "rl_global_step",
        MetricType.GAUGE,
        "Global optimisation step of the training run.",
        MetricGroup.RL,
        multiprocess_mode="mostrecent",
    ),
    MetricSpec(
        "rl_last_update_timestamp_seconds",
        MetricType.GAUGE,
        "Unix time of the latest RL update (drives the training-stalled alert).",
        MetricGroup.RL,
        multiprocess_mode="mostrecent",
    ),
    MetricSpec(
        "rl_run_info",
        MetricType.GAUGE,
        "Hyperparameters of the training run as labels (value is always 1).",
        MetricGroup.LOGGER,
        dynamic_labels=True,
        multiprocess_mode="mostrecent",
    ),
    MetricSpec(
        "rl_logger_push_errors_total",
        MetricType.COUNTER,
        "Pushes of the Prometheus logger to the Pushgateway that failed or timed out.",
        MetricGroup.LOGGER,
    ),
    MetricSpec(
        "rl_logger_dropped_values_total",
        MetricType.COUNTER,
        "Logged values the Prometheus logger dropped instead of failing the training step.",
        MetricGroup.LOGGER,
        ("key", "reason"),
        # key: the logged key as written in the LightningModule (capped by the logger).
        {"reason": _values(DroppedValueReason)},
    ),
    MetricSpec(
        "rl_guard_threshold",
        MetricType.GAUGE,
        "Threshold the run's rollback guard was configured with (alerts compare against it).",
        MetricGroup.CHECKPOINT,
        ("threshold",),
        {"threshold": _values(GuardThreshold)},
        multiprocess_mode="mostrecent",
    ),
    MetricSpec(
        "api_request_total",
        MetricType.COUNTER,
        "HTTP requests by route template, method and status code.",
        MetricGroup.API,
        ("endpoint", "method", "status"),
        {"method": HTTP_METHODS},
    ),
    MetricSpec(
        "api_request_latency_seconds",
        MetricType.HISTOGRAM,
        "HTTP request latency by route template and method.",
        MetricGroup.API,
        ("endpoint", "method"),
        {"method": HTTP_METHODS},
        buckets=API_LATENCY_BUCKETS,
    ),
    MetricSpec(
        "inflight_requests",
        MetricType.GAUGE,
        "HTTP requests being served right now, per worker process.",
        MetricGroup.API,
        ("worker",),
        multiprocess_mode="livesum",
    ),
    MetricSpec(
        "checkpoint_saves_total",
        MetricType.COUNTER,
        "Checkpoint saves by result.",
        MetricGroup.CHECKPOINT,
        ("result",),
        {"result": SAVE_RESULTS},
    ),
    MetricSpec(
        "checkpoint_rollbacks_total",
        MetricType.COUNTER,
        "Automatic rollbacks to an earlier checkpoint, by trigger.",
        MetricGroup.CHECKPOINT,
        ("reason",),
        {"reason": _values(RollbackReason)},
    ),
    MetricSpec(
        "checkpoint_save_seconds",
        MetricType.HISTOGRAM,
        "Checkpoint save time: blocking = training thread stalled, write = background write.",
        MetricGroup.CHECKPOINT,
        ("phase",),
        {"phase": SAVE_PHASES},
        buckets=CHECKPOINT_SAVE_BUCKETS,
    ),
    MetricSpec(
        "model_reload_total",
        MetricType.COUNTER,
        "Hot reloads of the served model by result.",
        MetricGroup.RELOAD,
        ("result",),
        {"result": _values(ReloadResult)},
    ),
    MetricSpec(
        "model_reload_phase_seconds",
        MetricType.HISTOGRAM,
        "Duration of each hot-reload phase.",
        MetricGroup.RELOAD,
        ("phase",),
        {"phase": tuple(phase.value for phase in RELOAD_TIMED_PHASES)},
        buckets=RELOAD_PHASE_BUCKETS,
    ),
    MetricSpec(
        "model_reload_drain_timeout_requests_total",
        MetricType.COUNTER,
        "Requests still running on the old worker when its drain timed out, by what was done.",
        MetricGroup.RELOAD,
        ("action",),
        {"action": _values(DrainTimeoutAction)},
    ),
    MetricSpec(
        "model_reload_abandoned_loads_total",
        MetricType.COUNTER,
        "Model loads abandoned past the load deadline: the thread could not be stopped and its "
        "result was discarded (the reload itself counts as load_failed).",
        MetricGroup.RELOAD,
    ),
    MetricSpec(
        "model_info",
        MetricType.GAUGE,
        "Model versions in a serving process: 1 while the version holds the role, else 0.",
        MetricGroup.RELOAD,
        ("role", "version"),
        {"role": _values(ModelRole)},
        # livemax: 1 while ANY live worker serves the version in that role; a gauge, not an Info,
        # because multiprocess mode exports no Info and cannot remove series (issue 4).
        multiprocess_mode="livemax",
    ),
    # Per model line (policy, brief LLM): version names of two lines may coincide, so their
    # versions and reloads are told apart by a `model` label. Additive: the model_* metrics
    # above stay the policy line's, so existing alerts and panels keep their meaning.
    MetricSpec(
        "model_line_info",
        MetricType.GAUGE,
        "Model versions per model line: 1 while the version holds the role, else 0.",
        MetricGroup.RELOAD,
        ("model", "role", "version"),
        {"model": _values(ModelLine), "role": _values(ModelRole)},
        multiprocess_mode="livemax",
    ),
    MetricSpec(
        "model_line_reload_total",
        MetricType.COUNTER,
        "Hot reloads per model line by result.",
        MetricGroup.RELOAD,
        ("model", "result"),
        {"model": _values(ModelLine), "result": _values(ReloadResult)},
    ),
    MetricSpec(
        "model_line_reload_phase_seconds",
        MetricType.HISTOGRAM,
        "Duration of each hot-reload phase per model line.",
        MetricGroup.RELOAD,
        ("model", "phase"),
        {
            "model": _values(ModelLine),
            "phase": tuple(phase.value for phase in RELOAD_TIMED_PHASES),
        },
        buckets=RELOAD_PHASE_BUCKETS,
    ),
    # The drain and load-deadline counters per line: the brief LLM line drains generate calls
    # of seconds and loads for minutes, so its timeouts are the ones an operator must see.
    MetricSpec(
        "model_line_drain_timeout_requests_total",
        MetricType.COUNTER,
        "Requests still running on a model line's old worker when its drain timed out, by "
        "what was done.",
        MetricGroup.RELOAD,
        ("model", "action"),
        {"model": _values(ModelLine), "action": _values(DrainTimeoutAction)},
    ),
    MetricSpec(
        "model_line_reload_abandoned_loads_total",
        MetricType.COUNTER,
        "Model loads of a model line abandoned past its load deadline: the thread could not be "
        "stopped and its result was discarded (the reload itself counts as load_failed).",
        MetricGroup.RELOAD,
        ("model",),
        {"model": _values(ModelLine)},
    ),
)

CATALOGUE: Mapping[str, MetricSpec] = {spec.name: spec for spec in _CATALOGUE}


def spec(name: str) -> MetricSpec:
    """Return the spec of a catalogued metric.

    Raises:
        KeyError: With the list of known names, when ``name`` is not catalogued.
    """
    try:
        return CATALOGUE[name]
    except KeyError:
        raise KeyError(
            f"unknown metric {name!r}; catalogued metrics: {sorted(CATALOGUE)}"
        ) from None


def specs(groups: frozenset[MetricGroup] | None = None) -> Iterator[MetricSpec]:
    """Iterate the catalogue, optionally restricted to some groups, in definition order."""
    for item in _CATALOGUE:
        if groups is None or item.group in groups:
            yield item


def series_to_metric() -> dict[str, str]:
    """Map every exposed sample name (``x_bucket``, ``x_count``...) to its catalogued metric."""
    return {series: item.name for item in _CATALOGUE for series in item.series_names}
