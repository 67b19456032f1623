"""Operations metrics: the catalogue, the collector and the checkpoint observer (no Lightning).

The Lightning logger lives in ``lightning_fragrance.loggers``; the Grafana dashboard, Prometheus
config and alert rules in ``monitoring/`` at the repository root.
"""

from lightning_fragrance.monitoring.checkpoint_observer import (
    PrometheusCheckpointObserver,
    normalise_rollback_reason,
)
from lightning_fragrance.monitoring.collector import (
    ApiRequestOutcome,
    BriefOutcome,
    OperationsMetricsCollector,
    multiprocess_dir,
)
from lightning_fragrance.monitoring.metrics import (
    CATALOGUE,
    BriefMode,
    MetricGroup,
    MetricSpec,
    MetricType,
    ModelRole,
    ReloadPhase,
    ReloadResult,
    RepairType,
    RollbackReason,
)

__all__ = [
    "CATALOGUE",
    "ApiRequestOutcome",
    "BriefMode",
    "BriefOutcome",
    "MetricGroup",
    "MetricSpec",
    "MetricType",
    "ModelRole",
    "OperationsMetricsCollector",
    "PrometheusCheckpointObserver",
    "ReloadPhase",
    "ReloadResult",
    "RepairType",
    "RollbackReason",
    "multiprocess_dir",
    "normalise_rollback_reason",
]
