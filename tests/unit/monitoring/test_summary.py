"""The short metrics summary the demo prints."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from lightning_fragrance.monitoring import OperationsMetricsCollector
from lightning_fragrance.monitoring.summary import format_summary


def test_summary_lists_updates_reward_and_rollbacks_by_reason() -> None:
    registry = CollectorRegistry()
    collector = OperationsMetricsCollector(registry)
    collector.record_rl_update("ppo", 0.1, 0.2, 0.3, 21.5, 1.0, 0.1, kl_divergence=0.01)
    collector.record_rollback("kl_spike")
    collector.record_checkpoint_save(0.01, 0.1)
    text = format_summary(registry)
    assert "rl_update_total             1" in text
    assert "rl_reward                   21.5" in text
    assert "checkpoint_rollbacks_total  1 (kl_spike=1)" in text
    assert "checkpoint_saves_total      1 (errors 0)" in text


def test_summary_shows_dashes_before_any_training_update() -> None:
    text = format_summary(CollectorRegistry())
    assert "rl_reward                   -" in text
