"""PrometheusCheckpointObserver: checkpoint engine events become metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from lightning_fragrance.checkpointing import CheckpointObserver
from lightning_fragrance.checkpointing import RollbackReason as EngineReason
from lightning_fragrance.monitoring import (
    OperationsMetricsCollector,
    PrometheusCheckpointObserver,
    RollbackReason,
    rollback_reason_label,
)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def observer(registry: CollectorRegistry) -> PrometheusCheckpointObserver:
    return PrometheusCheckpointObserver(OperationsMetricsCollector(registry))


def test_observer_satisfies_the_engines_protocol(observer: PrometheusCheckpointObserver) -> None:
    assert isinstance(observer, CheckpointObserver)


def test_the_engine_and_the_catalogue_share_one_rollback_reason_type() -> None:
    assert EngineReason is RollbackReason
    for reason in EngineReason:
        assert rollback_reason_label(reason) == reason.value


def test_an_unknown_reason_string_becomes_other() -> None:
    assert rollback_reason_label("cosmic ray") == "other"
    assert rollback_reason_label("loss_spike") == "loss_spike"


def test_saves_rollbacks_and_errors_feed_the_checkpoint_metrics(
    observer: PrometheusCheckpointObserver, registry: CollectorRegistry
) -> None:
    observer.on_checkpoint_saved(500, 1024, 0.004, 0.120)
    observer.on_checkpoint_saved(1000, 1024, 0.006, 0.080)
    observer.on_rollback(1200, 1000, "loss_spike")
    observer.on_checkpoint_error(1500, OSError("disk full"))

    assert registry.get_sample_value("checkpoint_saves_total", {"result": "success"}) == 2
    assert registry.get_sample_value("checkpoint_saves_total", {"result": "error"}) == 1
    assert registry.get_sample_value("checkpoint_rollbacks_total", {"reason": "loss_spike"}) == 1
    blocking = registry.get_sample_value("checkpoint_save_seconds_sum", {"phase": "blocking"})
    assert blocking == pytest.approx(0.010)
    assert registry.get_sample_value("checkpoint_save_seconds_count", {"phase": "write"}) == 2


def test_an_invalid_measurement_is_logged_not_raised(
    observer: PrometheusCheckpointObserver, caplog: pytest.LogCaptureFixture
) -> None:
    observer.on_checkpoint_saved(500, 1024, -1.0, 0.1)  # a clock bug must not break a save
    assert "could not record the checkpoint save of step 500" in caplog.text


def test_guard_start_publishes_the_configured_thresholds_and_skips_unknown_names(
    observer: PrometheusCheckpointObserver, registry: CollectorRegistry
) -> None:
    def threshold(name: str) -> float | None:
        return registry.get_sample_value("rl_guard_threshold", {"threshold": name})

    assert threshold("kl_threshold") is None  # no series before a guard starts: no fake 0
    observer.on_guard_start(
        "guard-run-7",
        {
            "kl_threshold": 0.3,
            "loss_increase_multiplier": 2.0,
            "reward_drop_threshold": 0.25,
            "grad_norm_threshold": 10.0,
        },
    )
    assert threshold("kl_threshold") == 0.3
    assert threshold("loss_increase_multiplier") == 2.0
    assert threshold("reward_drop_threshold") == 0.25
    assert threshold("grad_norm_threshold") is None
