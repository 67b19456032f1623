"""End to end against a real Prometheus + Pushgateway: every panel and alert has data.

A short real ``Trainer.fit`` (toy policy, RollbackCheckpoint with an injected KL spike) pushes
through ``PrometheusLogger``; an ``OperationsMetricsCollector`` with serving traffic is scraped
from ``/metrics``. Then every dashboard query and every alert expression (comparison removed)
must return data through Prometheus's HTTP API, with the recording rules evaluated every second.
"""

from __future__ import annotations

import json
import random
import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.examples.toy import DivergenceSpec, ToyPolicyModule, toy_dataloader
from lightning_fragrance.loggers import PrometheusLogger
from lightning_fragrance.monitoring import OperationsMetricsCollector
from lightning_fragrance.monitoring.dashboard import DASHBOARD_PATH, MONITORING_DIR
from lightning_fragrance.monitoring.servers import PrometheusAPI, free_port

pytestmark = pytest.mark.integration

RATE_INTERVAL = "30s"  # what Grafana would put for $__rate_interval at a 1 s scrape interval


def _serving_traffic(collector: OperationsMetricsCollector, rng: random.Random) -> None:
    for mode, centre in (("fast", 1.0), ("balanced", 2.0), ("creative", 5.0)):
        collector.record_llm_brief(mode, rng.random() > 0.1, rng.uniform(0.5, 1.5) * centre)
    collector.record_llm_brief("creative", True, 3.0, repaired=True, repair_type="json_syntax")
    with collector.track_api_request("/dna/create", "POST") as request:
        request.set_status_code(200)
    collector.record_api_request("/health", "GET", 200, 0.002)
    collector.record_api_request("/dna/create", "POST", 422, 0.01)
    collector.record_reload_phase("loading", rng.uniform(0.1, 0.5))
    collector.record_reload_phase("warming", rng.uniform(0.1, 0.5))
    collector.record_line_reload_phase("brief_llm", "warming", rng.uniform(0.1, 0.5))
    # The brief LLM line's drain timeouts and abandoned loads, per line (issue 11).
    collector.record_line_drain_timeout("brief_llm", 1, "reject")
    collector.record_line_abandoned_load("brief_llm")


@pytest.fixture(scope="module")
def live(stack_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusAPI]:
    registry = CollectorRegistry()
    collector = OperationsMetricsCollector(registry)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    collector.set_model_version("000001-step10", "draining")
    collector.set_model_version("000002-step20", "current")
    collector.set_line_version("policy", "000002-step20", "current")
    collector.set_line_version("brief_llm", "000003-step300", "current")
    collector.record_line_reload("brief_llm", "success")
    collector.record_line_reload("brief_llm", "load_failed")  # ModelLineReloadFailed's data
    collector.record_model_reload("success", {"validating": 0.05, "switching": 0.001})
    collector.record_model_reload("warmup_failed")
    collector.record_model_reload("rolled_back", {"stopped": 0.02})
    collector.record_drain_timeout(1, "reject")
    stop = threading.Event()
    rng = random.Random(0)

    def traffic() -> None:
        while not stop.wait(0.2):
            _serving_traffic(collector, rng)

    feeder = threading.Thread(target=traffic, daemon=True)
    feeder.start()
    stack = stack_factory((f"127.0.0.1:{port}",))
    try:
        logger = PrometheusLogger(
            pushgateway_url=stack.pushgateway.address,
            job="lightning_fragrance",
            run_id="it-run",
            push_interval=0.5,
            push_timeout=2.0,
        )
        rollback = RollbackCheckpoint(
            dirpath=tmp_path_factory.mktemp("ckpt"),
            save_every_n_steps=4,
            observers=[logger.checkpoint_observer],
        )
        trainer = pl.Trainer(
            max_steps=24,
            logger=logger,
            callbacks=[rollback],
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        # A clip fraction a hair above 1: dropped and counted, so its panel has data too.
        logger.log_metrics({"train/clip_fraction": 1.0000001}, step=0)
        model = ToyPolicyModule(divergence=DivergenceSpec(at_step=10, loss_scale=1.0, kl=0.5))
        trainer.fit(model, toy_dataloader(n=256))
        assert rollback.rollback_count >= 1, "the injected KL spike must trigger a rollback"
        api = PrometheusAPI(stack.prometheus.url)
        # Both sources scraped at least twice (rate() needs two samples), rules evaluated.
        api.wait_for('rl_reward{run_id="it-run"}')
        api.wait_for('count_over_time(llm_brief_total{mode="creative",status="success"}[1m]) > 3')
        api.wait_for("count_over_time(rl_update_total[1m]) > 2")
        api.wait_for("endpoint:api_request_latency_seconds:p95_5m")
        yield api
    finally:
        stop.set()
        feeder.join()
        server.shutdown()
        server.server_close()


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    exprs = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    return [(title, expr.replace("$__rate_interval", RATE_INTERVAL)) for title, expr in exprs]


def _annotation_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    return [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]


# Vector-matching modifiers after a comparison operator ("> on(run_id) group_left x"): not part
# of the right-hand operand, which must be queried on its own.
_MATCHING = re.compile(
    r"^\s*(bool\s+)?((on|ignoring)\s*\([^)]*\)\s*)?"
    r"((group_left|group_right)(\s*\([^)]*\))?\s*)?"
)


def _split_comparison(expr: str) -> list[str]:
    """The operands of the top-level comparison of an alert expression (numbers dropped)."""
    depth = 0
    quote = False
    for index, char in enumerate(expr):
        if char == '"':
            quote = not quote
        if quote:
            continue
        depth += char in "([{"
        depth -= char in ")]}"
        if depth == 0 and char in "<>=!" and expr[index + 1 : index + 2] != "~":
            end = index + 2 if expr[index + 1 : index + 2] == "=" else index + 1
            sides = [expr[:index].strip(), _MATCHING.sub("", expr[end:]).strip()]
            return [side for side in sides if not re.fullmatch(r"[-+0-9.e]+", side)]
    raise AssertionError(f"alert expression without a comparison: {expr}")


def _alert_exprs() -> list[tuple[str, str]]:
    content = yaml.safe_load((MONITORING_DIR / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in content["groups"] for rule in group["rules"]]


def test_every_dashboard_query_returns_data_from_prometheus(live: PrometheusAPI) -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 25
    empty = [f"{title}: {expr}" for title, expr in exprs if not live.wait_for(expr, timeout=10)]
    assert not empty, "queries without data:\n" + "\n".join(empty)


@pytest.mark.parametrize("source", ["alerts", "annotations"])
def test_every_alert_and_annotation_expression_without_its_comparison_returns_data(
    live: PrometheusAPI, source: str
) -> None:
    empty = []
    for name, expr in _alert_exprs() if source == "alerts" else _annotation_exprs():
        for operand in _split_comparison(expr):
            if not live.wait_for(operand, timeout=10):
                empty.append(f"{name}: {operand}")
    assert not empty, "alert operands without data:\n" + "\n".join(empty)


def test_pushed_training_metrics_keep_job_run_id_and_rank_labels(live: PrometheusAPI) -> None:
    series = live.query('rl_loss{type="total"}')
    assert [s["metric"]["job"] for s in series] == ["lightning_fragrance"]
    assert series[0]["metric"]["run_id"] == "it-run"
    assert series[0]["metric"]["rank"] == "0"
    updates = live.query('rl_update_total{algorithm="ppo", run_id="it-run"}')
    assert float(updates[0]["value"][1]) == 24.0  # one per optimizer step of max_steps=24


def test_rollback_and_saves_of_rollback_checkpoint_reach_prometheus(live: PrometheusAPI) -> None:
    rollbacks = live.query('checkpoint_rollbacks_total{reason="kl_spike", run_id="it-run"}')
    assert float(rollbacks[0]["value"][1]) >= 1.0
    saves = live.query('checkpoint_saves_total{result="success", run_id="it-run"}')
    assert float(saves[0]["value"][1]) >= 2.0
    write_times = live.query('checkpoint_save_seconds_count{phase="write", run_id="it-run"}')
    assert float(write_times[0]["value"][1]) == float(saves[0]["value"][1])


def test_creative_p95_recording_rule_reflects_scraped_latencies(live: PrometheusAPI) -> None:
    # Creative latencies are drawn from 2.5-7.5 s: the recorded p95 must sit in that range,
    # and fast (0.5-1.5 s) must be below its own 2.5 s objective.
    creative = live.query('mode:llm_brief_latency_seconds:p95_5m{mode="creative"}')
    fast = live.query('mode:llm_brief_latency_seconds:p95_5m{mode="fast"}')
    assert 2.5 <= float(creative[0]["value"][1]) <= 7.5
    assert float(fast[0]["value"][1]) < 2.5


def test_prometheus_loaded_the_repository_rule_files(live: PrometheusAPI) -> None:
    with urllib.request.urlopen(f"{live.url}/api/v1/rules", timeout=5) as response:
        groups = json.load(response)["data"]["groups"]
    files = {Path(group["file"]).name for group in groups}
    assert files == {"recording_rules.yml", "alerts.yml"}


def _panel_exprs(title: str) -> list[str]:
    return [expr for panel_title, expr in _dashboard_exprs() if panel_title == title]


def test_brief_lines_drain_timeouts_and_abandoned_loads_show_per_line_on_their_panels(
    live: PrometheusAPI,
) -> None:
    (drain,) = _panel_exprs("Requests past the drain timeout per line")
    rows = {
        (r["metric"]["model"], r["metric"]["action"]): float(r["value"][1])
        for r in live.wait_for(drain)
    }
    assert rows[("brief_llm", "reject")] > 0
    assert rows[("policy", "reject")] == 0.0  # the policy line had none
    abandoned = next(e for e in _panel_exprs("Reloads per line by result") if "abandoned" in e)
    per_line = {r["metric"]["model"]: float(r["value"][1]) for r in live.wait_for(abandoned)}
    assert per_line["brief_llm"] > 0 and per_line["policy"] == 0.0
    # The policy's unlabelled counter keeps its meaning: only the policy's own drain timeout.
    policy = live.query('model_reload_drain_timeout_requests_total{action="reject"}')
    assert float(policy[0]["value"][1]) == 1.0
