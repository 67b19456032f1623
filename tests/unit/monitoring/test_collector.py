"""OperationsMetricsCollector: the guide's API, validation and bounded cardinality."""

from __future__ import annotations

import math
import subprocess

import pytest
from prometheus_client import CollectorRegistry

from lightning_fragrance.monitoring import MetricGroup, OperationsMetricsCollector
from lightning_fragrance.monitoring.metrics import LLM_LATENCY_BUCKETS


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def collector(registry: CollectorRegistry) -> OperationsMetricsCollector:
    return OperationsMetricsCollector(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_record_llm_brief_counts_status_latency_and_repair(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    collector.record_llm_brief("creative", True, 4.2, repaired=True, repair_type="json_syntax")
    collector.record_llm_brief("creative", False, 6.0)

    assert value(registry, "llm_brief_total", mode="creative", status="success") == 1
    assert value(registry, "llm_brief_total", mode="creative", status="failure") == 1
    assert (
        value(registry, "llm_brief_repairs_total", mode="creative", repair_type="json_syntax") == 1
    )
    assert value(registry, "llm_brief_latency_seconds_count", mode="creative") == 2
    assert value(registry, "llm_brief_latency_seconds_sum", mode="creative") == pytest.approx(10.2)
    assert value(registry, "llm_brief_latency_seconds_bucket", mode="creative", le="4.5") == 1


def test_known_label_combinations_exist_at_zero_before_any_traffic(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    assert value(registry, "llm_brief_total", mode="fast", status="failure") == 0
    assert value(registry, "model_reload_total", result="warmup_failed") == 0
    assert value(registry, "model_reload_total", result="rolled_back") == 0
    assert value(registry, "model_reload_phase_seconds_count", phase="stopped") == 0
    for action in ("leave_running", "reject"):
        assert value(registry, "model_reload_drain_timeout_requests_total", action=action) == 0
    assert (
        registry.get_sample_value("model_reload_phase_seconds_count", {"phase": "failed"}) is None
    )
    assert value(registry, "checkpoint_rollbacks_total", reason="kl_spike") == 0


def test_latency_buckets_put_each_mode_objective_on_an_edge() -> None:
    for objective in (2.5, 3.2, 4.5):
        assert objective in LLM_LATENCY_BUCKETS


def test_track_llm_brief_marks_repairs_and_failures(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    with collector.track_llm_brief("balanced") as brief:
        brief.mark_repaired("missing_fields")
    with collector.track_llm_brief("balanced") as brief:
        brief.mark_failed()

    assert value(registry, "llm_brief_total", mode="balanced", status="success") == 1
    assert value(registry, "llm_brief_total", mode="balanced", status="failure") == 1
    assert (
        value(registry, "llm_brief_repairs_total", mode="balanced", repair_type="missing_fields")
        == 1
    )
    assert value(registry, "llm_brief_latency_seconds_count", mode="balanced") == 2


def test_an_exception_inside_track_llm_brief_counts_a_failure_and_propagates(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    with pytest.raises(TimeoutError), collector.track_llm_brief("fast"):
        raise TimeoutError("llm timed out")
    assert value(registry, "llm_brief_total", mode="fast", status="failure") == 1
    assert value(registry, "llm_brief_latency_seconds_count", mode="fast") == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.record_llm_brief("turbo", True, 1.0), "allowed values are fast, balanced"),
        (lambda c: c.record_llm_brief("fast", True, -0.1), ">= 0"),
        (lambda c: c.record_llm_brief("fast", True, math.nan), "finite"),
        (
            lambda c: c.record_llm_brief("fast", True, 1.0, True, "magic"),
            "allowed values are truncated, single_quotes",
        ),
        (
            lambda c: c.record_api_request("/dna/create", "FETCH", 200, 0.1),
            "allowed values are GET",
        ),
        (lambda c: c.record_api_request("/dna/create", "GET", 999, 0.1), "100-599"),
        (lambda c: c.record_api_request("/dna/create", "GET", 200, math.inf), "finite"),
        (lambda c: c.record_rl_update("ppo", 0.1, 0.2, 0.3, math.nan, 1.0, 0.1), "reward"),
        (lambda c: c.record_rl_update("ppo", 0.1, 0.2, 0.3, 1.0, 1.0, 1.5), "clip_fraction"),
        (lambda c: c.record_rl_update("PPO v2!", 0.1, 0.2, 0.3, 1.0, 1.0, 0.1), "identifier"),
        (lambda c: c.record_rollback("bad_luck"), "allowed values are kl_spike"),
        (lambda c: c.record_model_reload("exploded"), "allowed values are success"),
        (lambda c: c.record_reload_phase("dancing", 1.0), "allowed values are loading"),
        # FAILED ends a reload; it is a state, not a timed phase (model_reload_total counts it).
        (lambda c: c.record_reload_phase("failed", 1.0), "allowed values are loading"),
        (lambda c: c.set_model_version("v1", "primary"), "allowed values are current, draining"),
        (lambda c: c.record_drain_timeout(1, "kill"), "allowed values are leave_running, reject"),
        (lambda c: c.record_drain_timeout(-1, "reject"), ">= 0"),
        (lambda c: c.set_model_version("../etc", "current"), "version"),
        (lambda c: c.record_checkpoint_save(-1.0), ">= 0"),
    ],
)
def test_bad_input_raises_value_error_naming_what_is_allowed(
    collector: OperationsMetricsCollector, call: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(collector)  # type: ignore[operator]


def test_a_rejected_rl_update_records_nothing(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    with pytest.raises(ValueError):
        collector.record_rl_update("ppo", 0.1, 0.2, 0.3, 1.0, 1.0, 1.5)
    assert value(registry, "rl_update_total", algorithm="ppo") is None
    assert value(registry, "rl_loss", type="policy") is None


def test_record_rl_update_sets_every_gauge_and_counts_the_update(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    collector.record_rl_update("ppo", 0.1, 0.2, 0.3, 21.0, 1.1, 0.12, kl_divergence=0.01)
    collector.record_rl_update("ppo", 0.1, 0.2, 0.3, 22.0, 1.1, 0.12)

    assert value(registry, "rl_update_total", algorithm="ppo") == 2
    assert value(registry, "rl_loss", type="value") == 0.2
    assert value(registry, "rl_reward") == 22.0
    assert value(registry, "rl_kl_divergence") == 0.01  # kept: the second update had none
    assert value(registry, "rl_last_update_timestamp_seconds") > 0


def test_raw_paths_are_rejected_in_favour_of_route_templates(
    collector: OperationsMetricsCollector,
) -> None:
    for raw in ("/models/000012", "/briefs/3f2b8c1e-1d2a-4c3b-9a8e-1234567890ab", "/x?page=2"):
        with pytest.raises(ValueError, match="route template"):
            collector.record_api_request(raw, "GET", 200, 0.01)
    collector.record_api_request("/models/{version}", "GET", 200, 0.01)


def test_endpoint_label_cardinality_is_capped() -> None:
    collector = OperationsMetricsCollector(CollectorRegistry(), max_endpoints=3)
    for route in ("/a", "/b", "/c"):
        collector.record_api_request(route, "GET", 200, 0.01)
    collector.record_api_request("/a", "GET", 500, 0.01)  # a known route stays accepted
    with pytest.raises(ValueError, match="cap of 3"):
        collector.record_api_request("/d", "GET", 200, 0.01)


def test_track_api_request_counts_inflight_and_defaults_the_status(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    worker = collector.worker
    with collector.track_api_request("/dna/create", "post") as request:
        assert value(registry, "inflight_requests", worker=worker) == 1
        request.set_status_code(201)
    with collector.track_api_request("/health", "GET"):
        pass
    with pytest.raises(RuntimeError), collector.track_api_request("/dna/create", "POST"):
        raise RuntimeError("handler bug")

    assert value(registry, "inflight_requests", worker=worker) == 0
    assert (
        value(registry, "api_request_total", endpoint="/dna/create", method="POST", status="201")
        == 1
    )
    assert value(registry, "api_request_total", endpoint="/health", method="GET", status="200") == 1
    assert (
        value(registry, "api_request_total", endpoint="/dna/create", method="POST", status="500")
        == 1
    )


def test_model_info_moves_a_version_between_roles_and_zeroes_it_when_it_leaves(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    collector.set_model_version("000001-step100", "current")
    collector.set_model_version("000001-step100", "draining")
    collector.set_model_version("000002-step200", "current")
    collector.retire_model_version("000001-step100")

    assert value(registry, "model_info", role="current", version="000001-step100") == 0
    assert value(registry, "model_info", role="draining", version="000001-step100") == 0
    assert value(registry, "model_info", role="current", version="000002-step200") == 1


def test_reload_and_checkpoint_recorders_feed_their_metrics(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    with collector.track_reload_phase("warming"):
        pass
    collector.record_model_reload("success", {"loading": 0.5, "switching": 0.001})
    collector.record_checkpoint_save(0.01, 0.2)
    collector.record_checkpoint_error()
    collector.record_rollback("kl_spike")
    collector.record_drain_timeout(3, "reject")

    assert value(registry, "model_reload_total", result="success") == 1
    assert value(registry, "model_reload_drain_timeout_requests_total", action="reject") == 3
    assert value(registry, "model_reload_phase_seconds_count", phase="warming") == 1
    assert value(registry, "model_reload_phase_seconds_sum", phase="loading") == 0.5
    assert value(registry, "checkpoint_saves_total", result="success") == 1
    assert value(registry, "checkpoint_saves_total", result="error") == 1
    assert value(registry, "checkpoint_save_seconds_sum", phase="write") == 0.2
    assert value(registry, "checkpoint_rollbacks_total", reason="kl_spike") == 1


def test_a_collector_limited_to_some_groups_refuses_the_others() -> None:
    registry = CollectorRegistry()
    collector = OperationsMetricsCollector(registry, groups=frozenset({MetricGroup.RL}))
    assert value(registry, "llm_brief_total", mode="fast", status="success") is None
    with pytest.raises(RuntimeError, match="not part of this collector"):
        collector.record_llm_brief("fast", True, 1.0)


def test_a_second_collector_on_the_same_registry_says_how_to_fix_it(
    registry: CollectorRegistry, collector: OperationsMetricsCollector
) -> None:
    with pytest.raises(ValueError, match="registry=CollectorRegistry"):
        OperationsMetricsCollector(registry)


def test_exposition_is_valid_for_promtool_check_metrics(
    collector: OperationsMetricsCollector, promtool: str
) -> None:
    collector.record_llm_brief("fast", True, 1.0)
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=collector.exposition(),
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_rl_gauges_are_nan_until_the_first_update(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    assert math.isnan(value(registry, "rl_reward") or 0.0)
    assert math.isnan(value(registry, "rl_last_update_timestamp_seconds") or 0.0)


def test_the_guides_repair_name_code_block_counts_as_code_fence(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    with collector.track_llm_brief("creative") as tracker:
        tracker.mark_repaired("code_block")  # the operations guide's literal call
    collector.record_llm_brief("fast", True, 0.5, repaired=True, repair_type="code_block")

    assert tracker.repair_type == "code_fence"
    repairs = "llm_brief_repairs_total"
    for mode in ("creative", "fast"):
        assert value(registry, repairs, mode=mode, repair_type="code_fence") == 1
        assert value(registry, repairs, mode=mode, repair_type="code_block") is None


def test_an_unknown_repair_name_is_refused_with_the_values_and_aliases(
    collector: OperationsMetricsCollector,
) -> None:
    with pytest.raises(ValueError, match=r"code_fence.*code_block"):
        collector.record_llm_brief("fast", True, 0.5, repaired=True, repair_type="codeblock")


def test_an_abandoned_model_load_is_counted(registry: CollectorRegistry) -> None:
    collector = OperationsMetricsCollector(registry, groups=[MetricGroup.RELOAD])
    assert registry.get_sample_value("model_reload_abandoned_loads_total") == 0
    collector.record_abandoned_load()
    assert registry.get_sample_value("model_reload_abandoned_loads_total") == 1


def test_drain_timeouts_and_abandoned_loads_are_counted_per_model_line(
    collector: OperationsMetricsCollector, registry: CollectorRegistry
) -> None:
    for line in ("policy", "brief_llm"):
        assert value(registry, "model_line_reload_abandoned_loads_total", model=line) == 0
        for action in ("leave_running", "reject"):
            labels = {"model": line, "action": action}
            assert value(registry, "model_line_drain_timeout_requests_total", **labels) == 0
    collector.record_line_drain_timeout("brief_llm", 3, "reject")
    collector.record_line_abandoned_load("brief_llm")
    name = "model_line_drain_timeout_requests_total"
    assert value(registry, name, model="brief_llm", action="reject") == 3
    assert value(registry, name, model="policy", action="reject") == 0
    assert value(registry, "model_line_reload_abandoned_loads_total", model="brief_llm") == 1
    # The unlabelled model_* counters stay the policy line's.
    assert value(registry, "model_reload_drain_timeout_requests_total", action="reject") == 0
    assert registry.get_sample_value("model_reload_abandoned_loads_total") == 0


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (lambda c: c.record_line_drain_timeout("llm", 1, "reject"), "policy, brief_llm"),
        (lambda c: c.record_line_drain_timeout("brief_llm", 1, "kill"), "leave_running, reject"),
        (lambda c: c.record_line_drain_timeout("brief_llm", -1, "reject"), ">= 0"),
        (lambda c: c.record_line_abandoned_load("llm"), "policy, brief_llm"),
    ],
)
def test_per_line_drain_and_load_counters_refuse_unknown_lines_and_bad_counts(
    collector: OperationsMetricsCollector, record: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        record(collector)  # type: ignore[operator]
