"""Prometheus rule files: promtool accepts them, unit tests pass, thresholds match the catalogue."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from lightning_fragrance.monitoring.dashboard import (
    MONITORING_DIR,
    check_dashboard,
    load_recording_rules,
    metric_names,
)
from lightning_fragrance.monitoring.metrics import (
    API_P95_OBJECTIVE_SECONDS,
    BRIEF_P95_OBJECTIVE_SECONDS,
    LLM_LATENCY_BUCKETS,
)

RULE_FILES = [MONITORING_DIR / "recording_rules.yml", MONITORING_DIR / "alerts.yml"]


def _alerts() -> dict[str, dict]:
    content = yaml.safe_load((MONITORING_DIR / "alerts.yml").read_text())
    return {rule["alert"]: rule for group in content["groups"] for rule in group["rules"]}


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, cwd=MONITORING_DIR)


def test_promtool_check_rules_accepts_the_rule_files(promtool: str) -> None:
    result = _run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config_accepts_prometheus_yml(promtool: str) -> None:
    result = _run(promtool, "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass(promtool: str) -> None:
    result = _run(promtool, "test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_tests_cover_creative_p95_firing_and_staying_silent() -> None:
    content = yaml.safe_load((MONITORING_DIR / "alerts_test.yml").read_text())
    outcomes = [
        bool(case["exp_alerts"])
        for test in content["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == "LLMBriefCreativeP95LatencyHigh"
    ]
    assert True in outcomes and False in outcomes


def test_a_wrong_expectation_makes_promtool_fail(promtool: str, tmp_path: Path) -> None:
    """Guards the guard: the alert test suite can fail (the creative alert is not silent)."""
    for name in ("recording_rules.yml", "alerts.yml"):
        (tmp_path / name).write_text((MONITORING_DIR / name).read_text())
    text = (MONITORING_DIR / "alerts_test.yml").read_text()
    broken = text.replace(
        'summary: "Creative LLM brief p95 latency 4.975s is above 4.5s"',
        'summary: "Creative LLM brief p95 latency 4.0s is above 4.5s"',
    )
    assert broken != text
    (tmp_path / "alerts_test.yml").write_text(broken)
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], capture_output=True, cwd=tmp_path
    )
    assert result.returncode != 0


def test_latency_alert_thresholds_are_the_catalogue_objectives_on_bucket_edges() -> None:
    alerts = _alerts()
    for mode, objective in BRIEF_P95_OBJECTIVE_SECONDS.items():
        rule = alerts[f"LLMBrief{mode.value.capitalize()}P95LatencyHigh"]
        assert f'mode="{mode.value}"' in rule["expr"]
        assert float(rule["expr"].rsplit(">", 1)[1]) == objective
        assert objective in LLM_LATENCY_BUCKETS
        assert rule["for"] == "5m"
    assert float(alerts["APIRequestP95LatencyHigh"]["expr"].rsplit(">", 1)[1]) == (
        API_P95_OBJECTIVE_SECONDS
    )


def test_every_alert_selects_only_catalogued_metrics_or_recording_rules() -> None:
    rules = load_recording_rules()
    alerts = _alerts()
    pseudo_dashboard = {
        "panels": [
            {"title": name, "type": "timeseries", "targets": [{"expr": rule["expr"]}]}
            for name, rule in alerts.items()
        ]
    }
    problems = check_dashboard(pseudo_dashboard, rules, catalogue=())
    assert problems == []


def test_recording_rules_follow_the_level_metric_operation_naming() -> None:
    for name, expr in load_recording_rules().items():
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name
        assert metric_names(expr), expr


def test_kl_alert_compares_each_run_with_its_own_guard_threshold() -> None:
    expr = _alerts()["RLKLDivergenceHigh"]["expr"]
    assert expr.startswith("rl_kl_divergence > on(run_id, rank)")
    assert 'rl_guard_threshold{threshold="kl_threshold"}' in expr
    assert not re.search(r">\s*[0-9.]+\s*$", expr)  # no constant threshold
    content = yaml.safe_load((MONITORING_DIR / "alerts_test.yml").read_text())
    fired_runs = {
        alert["exp_labels"]["run_id"]
        for test in content["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == "RLKLDivergenceHigh"
        for alert in case["exp_alerts"]
    }
    tested_runs = {
        re.search(r'run_id="(\w+)"', series["series"]).group(1)  # type: ignore[union-attr]
        for test in content["tests"]
        for series in test["input_series"]
        if series["series"].startswith("rl_kl_divergence")
    }
    assert "spiking" in fired_runs and "healthy" in tested_runs - fired_runs
