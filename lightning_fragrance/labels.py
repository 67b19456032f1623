"""Plain label types shared by the engines and the metrics catalogue.

Each `str` Enum here is both a value the engines use in code and the bounded vocabulary of a
Prometheus label, so the checkpointing and serving engines and `monitoring.metrics` import the
same members instead of keeping copies in step (no Lightning, FastAPI or prometheus_client here).
Files store the string values (``.value``): checkpoints must load with ``weights_only=True``.
"""

from __future__ import annotations

from enum import Enum


class RollbackReason(str, Enum):
    """Why training state was restored (``checkpoint_rollbacks_total{reason}``).

    The triggers of `lightning_fragrance.checkpointing` return the first five; ``MANUAL`` is an
    operator's rollback and ``OTHER`` keeps the label bounded for callers with their own reasons.
    """

    KL_SPIKE = "kl_spike"
    LOSS_SPIKE = "loss_spike"
    REWARD_DROP = "reward_drop"
    NON_FINITE = "non_finite"
    GRAD_NORM = "grad_norm_spike"
    MANUAL = "manual"
    OTHER = "other"


class ReloadResult(str, Enum):
    """Outcome of one hot reload or rollback (``model_reload_total{result}``)."""

    SUCCESS = "success"
    LOAD_FAILED = "load_failed"
    VALIDATION_FAILED = "validation_failed"
    WARMUP_FAILED = "warmup_failed"
    # The previous version serves again: POST /admin/model/rollback or the automatic revert on
    # the new version's error rate. Not a failure of the reload machinery, so not "failed".
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"  # another reload was in progress (HTTP 409) or the request was invalid


class ReloadPhase(str, Enum):
    """Phases of a hot reload, in order (DESIGN.md §7); ``FAILED`` ends one that did not switch.

    Every phase but ``FAILED`` is timed in ``model_reload_phase_seconds{phase}``. ``FAILED`` is a
    terminal state, not a duration: failures are counted by ``model_reload_total{result}``.
    """

    LOADING = "loading"
    VALIDATING = "validating"
    WARMING = "warming"
    SWITCHING = "switching"
    DRAINING = "draining"
    STOPPED = "stopped"  # releasing the old worker's memory (drop, malloc_trim, maybe a GC pass)
    FAILED = "failed"


class DrainTimeoutAction(str, Enum):
    """What serving does with a request still running on the old worker at ``drain_timeout``.

    Python cannot interrupt a thread inside torch, so the request always runs to its end;
    ``LEAVE_RUNNING`` lets its answer through, ``REJECT`` replaces it with a retriable error
    (HTTP 503 + ``Retry-After``). Also the label of
    ``model_reload_drain_timeout_requests_total{action}``.
    """

    LEAVE_RUNNING = "leave_running"
    REJECT = "reject"


class ModelRole(str, Enum):
    """Role of a model version in a serving process (``model_info{role}``)."""

    CURRENT = "current"
    DRAINING = "draining"
    # Serving, but not the version CURRENT names: that one failed at startup (issue 10).
    FALLBACK = "fallback"
