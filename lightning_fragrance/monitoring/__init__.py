"""Operations metrics: the catalogue, the collector and the checkpoint observer (no Lightning).

The Lightning logger lives in ``lightning_fragrance.loggers``; the Grafana dashboard, Prometheus
config and alert rules in ``monitoring/`` at the repository root.

The catalogue's vocabularies (plain enums) import eagerly; the collector and the checkpoint
observer, which import prometheus_client, load on first use (PEP 562). So the serving manager
can share the catalogue's enums without importing prometheus_client, whose multiprocess mode is
fixed when it is first imported (``PROMETHEUS_MULTIPROC_DIR`` must be set before that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_fragrance.lazy_exports import lazy_exports
from lightning_fragrance.monitoring.metrics import (
    CATALOGUE,
    REPAIR_TYPE_ALIASES,
    BriefMode,
    DrainTimeoutAction,
    DroppedValueReason,
    GuardThreshold,
    MetricGroup,
    MetricSpec,
    MetricType,
    ModelLine,
    ModelRole,
    ReloadPhase,
    ReloadResult,
    RepairType,
    RollbackReason,
)

if TYPE_CHECKING:
    from lightning_fragrance.monitoring.checkpoint_observer import (
        PrometheusCheckpointObserver,
        rollback_reason_label,
    )
    from lightning_fragrance.monitoring.collector import (
        ApiRequestOutcome,
        BriefOutcome,
        OperationsMetricsCollector,
        multiprocess_dir,
    )

_LAZY: dict[str, str] = {
    "ApiRequestOutcome": "lightning_fragrance.monitoring.collector",
    "BriefOutcome": "lightning_fragrance.monitoring.collector",
    "OperationsMetricsCollector": "lightning_fragrance.monitoring.collector",
    "multiprocess_dir": "lightning_fragrance.monitoring.collector",
    "PrometheusCheckpointObserver": "lightning_fragrance.monitoring.checkpoint_observer",
    "rollback_reason_label": "lightning_fragrance.monitoring.checkpoint_observer",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "CATALOGUE",
    "REPAIR_TYPE_ALIASES",
    "ApiRequestOutcome",
    "BriefMode",
    "BriefOutcome",
    "DrainTimeoutAction",
    "DroppedValueReason",
    "GuardThreshold",
    "MetricGroup",
    "MetricSpec",
    "MetricType",
    "ModelLine",
    "ModelRole",
    "OperationsMetricsCollector",
    "PrometheusCheckpointObserver",
    "ReloadPhase",
    "ReloadResult",
    "RepairType",
    "RollbackReason",
    "multiprocess_dir",
    "rollback_reason_label",
]
