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
    normalise_rollback_reason,
)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def observer(registry: CollectorRegistry) -> PrometheusCheckpointObserver:
    return PrometheusCheckpointObserver(OperationsMetricsCollector(registry))


def test_observer_satisfies_the_engines_protocol(observer: PrometheusCheckpointObserver) -> None:
    assert isinstance(observer, CheckpointObserver)


def test_every_engine_rollback_reason_has_its_own_label_value() -> None:
    for reason in EngineReason:
        assert normalise_rollback_reason(reason) == reason.value
        assert reason.value in {r.value for r in RollbackReason}


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("kl_spike", "kl_spike"),
        ("KL spike 0.05 > 0.03", "kl_spike"),
        ("loss spike 0.50 -> 1.20 (2.40x)", "loss_spike"),
        ("non-finite loss (nan)", "non_finite"),
        ("cosmic ray", "other"),
    ],
)
def test_free_text_reasons_map_onto_the_bounded_vocabulary(text: str, label: str) -> None:
    assert normalise_rollback_reason(text) == label


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
