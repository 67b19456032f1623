"""The Grafana dashboard is generated from the catalogue and checked against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_fragrance.monitoring.dashboard import (
    DASHBOARD_PATH,
    build_dashboard,
    check_dashboard,
    load_recording_rules,
    main,
    metric_names,
    render_dashboard,
)
from lightning_fragrance.monitoring.metrics import CATALOGUE

GUIDE_PANELS = [
    "LLM briefs by mode and status",
    "LLM brief repairs by type",
    "LLM brief p95 latency by mode",
    "LLM brief p99 latency by mode",
    "RL loss (policy / value / total)",
    "Reward",
    "Entropy",
    "Clip fraction",
    "KL divergence",
    "API requests by endpoint and status",
    "API p95 latency",
    "API p99 latency",
    "Operations summary",
]


@pytest.fixture
def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


def test_committed_dashboard_is_what_the_generator_writes() -> None:
    assert DASHBOARD_PATH.read_text() == render_dashboard(), (
        "stale: run python -m lightning_fragrance.monitoring.dashboard"
    )
    assert main(["--check"]) == 0


def test_committed_dashboard_agrees_with_the_catalogue(dashboard: dict) -> None:
    assert check_dashboard(dashboard, load_recording_rules()) == []


def test_a_panel_querying_an_undefined_metric_is_reported(dashboard: dict) -> None:
    dashboard["panels"][1]["targets"][0]["expr"] = "rate(llm_brief_totals[5m])"
    problems = check_dashboard(dashboard, load_recording_rules())
    assert any("'llm_brief_totals'" in p and "neither catalogued" in p for p in problems)


def test_a_catalogued_metric_without_a_panel_is_reported() -> None:
    dashboard = build_dashboard()
    dashboard["panels"] = [p for p in dashboard["panels"] if "Entropy" not in p.get("title", "")]
    problems = check_dashboard(dashboard, load_recording_rules())
    assert problems == ["metric 'rl_entropy' is catalogued but no panel shows it"]


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "dashboard.json"
    stale.write_text("{}")
    assert main(["--check", "--output", str(stale)]) == 1


def test_dashboard_has_the_guides_panels_with_their_thresholds(dashboard: dict) -> None:
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    assert set(GUIDE_PANELS) <= set(panels)

    def steps(title: str) -> list:
        return panels[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]

    assert steps("Reward") == [{"color": "red", "value": None}, {"color": "green", "value": 20.0}]
    assert steps("Clip fraction")[1] == {"color": "red", "value": 0.3}
    assert len(steps("KL divergence")) == 1  # no constant line: the run's guard threshold
    assert steps("API p95 latency")[1] == {"color": "red", "value": 2.5}
    per_mode = {
        o["matcher"]["options"]: o["properties"][0]["value"]["steps"][1]["value"]
        for o in panels["LLM brief p95 latency by mode"]["fieldConfig"]["overrides"]
    }
    assert per_mode == {"fast": 2.5, "balanced": 3.2, "creative": 4.5}


def test_dashboard_has_datasource_variable_annotations_and_valid_layout(dashboard: dict) -> None:
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    names = {a["name"] for a in dashboard["annotations"]["list"]}
    assert {"Rollbacks", "Model reloads"} <= names
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"


def test_every_catalogued_metric_is_shown(dashboard: dict) -> None:
    shown = set()
    rules = load_recording_rules()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                shown |= metric_names(rules.get(name, name))
    for metric in CATALOGUE.values():
        assert shown & set(metric.series_names), metric.name


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (mode, le) (rate(x_bucket{mode="a b"}[5m]))', {"x_bucket"}),
        ("time() - rl_last_update_timestamp_seconds > 900", {"rl_last_update_timestamp_seconds"}),
        ('a:b:c{x=~"y"} / on (job) group_left d', {"a:b:c", "d"}),
    ],
)
def test_metric_names_extracts_selectors_only(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_kl_panel_draws_each_runs_guard_threshold_instead_of_a_constant(dashboard: dict) -> None:
    panel = next(p for p in dashboard["panels"] if p["title"] == "KL divergence")
    exprs = [target["expr"] for target in panel["targets"]]
    assert exprs == ["rl_kl_divergence", 'rl_guard_threshold{threshold="kl_threshold"}']
    assert [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None]
