"""Lightning loggers: ``PrometheusLogger`` exports training metrics to Prometheus."""

from lightning_fragrance.loggers.prometheus import DEFAULT_METRIC_MAP, PrometheusLogger

__all__ = ["DEFAULT_METRIC_MAP", "PrometheusLogger"]
