"""Generate the Grafana operations dashboard from the metric catalogue, and check it.

``python -m lightning_fragrance.monitoring.dashboard`` rewrites
``monitoring/grafana_operations_dashboard.json``; ``--check`` exits 1 when the committed file is
stale or a panel and the catalogue disagree. The panels are the operations guide's 13 (brief
counts, repairs, p95/p99 by mode, RL loss/reward/entropy/clip fraction/KL, API counts, API
p95/p99, a summary table) plus checkpoint, rollback, reload and logger panels, with rollback and
reload annotations and a datasource variable.

Plain JSON from plain dicts: the research note found grafana-foundation-sdk and grafanalib both
work but recommends no runtime dependency for a file we commit anyway.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_fragrance.monitoring.metrics import (
    API_P95_OBJECTIVE_SECONDS,
    BRIEF_P95_OBJECTIVE_SECONDS,
    CATALOGUE,
    GuardThreshold,
    series_to_metric,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MONITORING_DIR = REPO_ROOT / "monitoring"
DASHBOARD_PATH = MONITORING_DIR / "grafana_operations_dashboard.json"
RECORDING_RULES_PATH = MONITORING_DIR / "recording_rules.yml"
DASHBOARD_UID = "lightning-fragrance-ops"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    """What a panel shows; layout and Grafana boilerplate are added by ``build_dashboard``."""

    title: str
    queries: Sequence[Query]
    unit: str = "short"
    kind: str = "timeseries"
    # (value, colour) steps after the base colour; e.g. reward: red below 20, green above.
    thresholds: Sequence[tuple[float, str]] = ()
    base_color: str = "green"
    width: int = 8
    description: str = ""
    overrides: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


def _mode_threshold_overrides() -> list[dict[str, Any]]:
    """Per-mode objective lines on the shared p95 panel: each series gets its own threshold."""
    return [
        {
            "matcher": {"id": "byName", "options": mode.value},
            "properties": [
                {
                    "id": "thresholds",
                    "value": {
                        "mode": "absolute",
                        "steps": [
                            {"color": "green", "value": None},
                            {"color": "red", "value": seconds},
                        ],
                    },
                }
            ],
        }
        for mode, seconds in BRIEF_P95_OBJECTIVE_SECONDS.items()
    ]


GUARD_THRESHOLD_LEGEND = "guard threshold"


def _guard_threshold_overrides() -> list[dict[str, Any]]:
    """Draw the guard's threshold series as a dashed red line next to the value it bounds."""
    return [
        {
            "matcher": {"id": "byRegexp", "options": f".*{GUARD_THRESHOLD_LEGEND}$"},
            "properties": [
                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
            ],
        }
    ]


SECTIONS: Sequence[tuple[str, Sequence[Panel]]] = (
    (
        "LLM briefs",
        (
            Panel(
                "LLM briefs by mode and status",
                [
                    Query(
                        f"sum by (mode, status) (rate(llm_brief_total[{RATE}]))",
                        "{{mode}} {{status}}",
                    )
                ],
                unit="reqps",
                width=6,
            ),
            Panel(
                "LLM brief repairs by type",
                [
                    Query(
                        f"sum by (repair_type) (rate(llm_brief_repairs_total[{RATE}]))",
                        "{{repair_type}}",
                    )
                ],
                unit="reqps",
                width=6,
            ),
            Panel(
                "LLM brief p95 latency by mode",
                [Query("mode:llm_brief_latency_seconds:p95_5m", "{{mode}}")],
                unit="s",
                width=6,
                description="Objectives: fast 2.5 s, balanced 3.2 s, creative 4.5 s (alerts).",
                overrides=_mode_threshold_overrides(),
            ),
            Panel(
                "LLM brief p99 latency by mode",
                [Query("mode:llm_brief_latency_seconds:p99_5m", "{{mode}}")],
                unit="s",
                width=6,
                overrides=_mode_threshold_overrides(),
            ),
        ),
    ),
    (
        "RL training",
        (
            Panel(
                "RL loss (policy / value / total)",
                [Query("rl_loss", "{{type}} {{run_id}}")],
                description="total includes policy and value: never sum over type.",
            ),
            Panel(
                "Reward",
                [Query("rl_reward", "{{run_id}}")],
                thresholds=[(20.0, "green")],
                base_color="red",
            ),
            Panel("Entropy", [Query("rl_entropy", "{{run_id}}")]),
            Panel(
                "Clip fraction",
                [Query("rl_clip_fraction", "{{run_id}}")],
                unit="percentunit",
                thresholds=[(0.3, "red")],
            ),
            Panel(
                "KL divergence",
                [
                    Query("rl_kl_divergence", "{{run_id}}"),
                    Query(
                        f'rl_guard_threshold{{threshold="{GuardThreshold.KL.value}"}}',
                        "{{run_id}} " + GUARD_THRESHOLD_LEGEND,
                    ),
                ],
                # No constant line: each run's own guard threshold (the guide's 0.03 paints a
                # healthy reference-task run red: its KL is 0.06-0.11 under a 0.3 guard).
                description="Dashed: the KL threshold the run's rollback guard was configured "
                "with; the RLKLDivergenceHigh alert compares against it.",
                overrides=_guard_threshold_overrides(),
            ),
            Panel(
                "RL updates per second",
                [
                    Query(
                        f"sum by (algorithm, run_id) (rate(rl_update_total[{RATE}]))",
                        "{{algorithm}} {{run_id}}",
                    )
                ],
                unit="ops",
            ),
        ),
    ),
    (
        "API",
        (
            Panel(
                "API requests by endpoint and status",
                [
                    Query(
                        f"sum by (endpoint, status) (rate(api_request_total[{RATE}]))",
                        "{{endpoint}} {{status}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "API p95 latency",
                [Query("endpoint:api_request_latency_seconds:p95_5m", "{{endpoint}}")],
                unit="s",
                thresholds=[(API_P95_OBJECTIVE_SECONDS, "red")],
            ),
            Panel(
                "API p99 latency",
                [Query("endpoint:api_request_latency_seconds:p99_5m", "{{endpoint}}")],
                unit="s",
            ),
            Panel(
                "In-flight requests per worker",
                [Query("sum by (worker) (inflight_requests)", "worker {{worker}}")],
            ),
        ),
    ),
    (
        "Summary",
        (
            Panel(
                "Operations summary",
                [
                    Query("sum(increase(llm_brief_total[1h]))", "briefs (1h)", instant=True),
                    Query(
                        'sum(increase(llm_brief_total{status="success"}[1h]))'
                        " / sum(increase(llm_brief_total[1h]))",
                        "brief success ratio (1h)",
                        instant=True,
                    ),
                    Query(
                        "max(mode:llm_brief_latency_seconds:p95_5m)",
                        "worst brief p95 (s)",
                        instant=True,
                    ),
                    Query(
                        "max(endpoint:api_request_latency_seconds:p95_5m)",
                        "worst API p95 (s)",
                        instant=True,
                    ),
                    Query("max(rl_reward)", "reward", instant=True),
                    Query("max(rl_kl_divergence)", "KL", instant=True),
                    Query(
                        "sum(increase(checkpoint_rollbacks_total[24h]))",
                        "rollbacks (24h)",
                        instant=True,
                    ),
                    Query("max(rl_global_step)", "global step", instant=True),
                ],
                kind="table",
                width=24,
            ),
        ),
    ),
    (
        "Checkpoints and rollbacks",
        (
            Panel(
                "Checkpoint saves by result",
                [
                    Query(
                        f"sum by (result) (increase(checkpoint_saves_total[{RATE}]))",
                        "{{result}}",
                    )
                ],
            ),
            Panel(
                "Rollbacks by reason",
                [
                    Query(
                        f"sum by (reason) (increase(checkpoint_rollbacks_total[{RATE}]))",
                        "{{reason}}",
                    )
                ],
            ),
            Panel(
                "Checkpoint save time p95 by phase",
                [Query("phase:checkpoint_save_seconds:p95_5m", "{{phase}}")],
                unit="s",
                description="blocking = training thread stalled; write = background write.",
            ),
            Panel("Global step", [Query("rl_global_step", "{{run_id}}")]),
            Panel(
                "Seconds since the last RL update",
                [Query("time() - rl_last_update_timestamp_seconds", "{{run_id}}")],
                unit="s",
                thresholds=[(900.0, "red")],
            ),
            Panel(
                "Logger push errors",
                [
                    Query(
                        f"sum by (run_id) (increase(rl_logger_push_errors_total[{RATE}]))",
                        "{{run_id}}",
                    )
                ],
                thresholds=[(1.0, "red")],
            ),
            Panel(
                "Logged values dropped by the logger",
                [
                    Query(
                        "sum by (run_id, key, reason) "
                        f"(increase(rl_logger_dropped_values_total[{RATE}]))",
                        "{{run_id}} {{key}} {{reason}}",
                    )
                ],
                description="Values the logger could not export (e.g. a clip fraction above 1); "
                "training went on. The log has one warning per key per minute.",
            ),
            Panel(
                "Run hyperparameters",
                [Query("rl_run_info", "", instant=True)],
                kind="table",
                width=24,
            ),
        ),
    ),
    (
        "Model serving",
        (
            Panel(
                "Model reloads by result",
                [
                    Query(
                        f"sum by (result) (increase(model_reload_total[{RATE}]))",
                        "{{result}}",
                    ),
                    Query(
                        f"sum(increase(model_reload_abandoned_loads_total[{RATE}]))",
                        "abandoned loads (past load_timeout_s)",
                    ),
                ],
            ),
            Panel(
                "Reload phase p95",
                [Query("phase:model_reload_phase_seconds:p95_1h", "{{phase}}")],
                unit="s",
            ),
            Panel(
                "Requests past the drain timeout",
                [
                    Query(
                        "sum by (action) (increase("
                        f"model_reload_drain_timeout_requests_total[{RATE}]))",
                        "{{action}}",
                    )
                ],
                thresholds=[(1.0, "orange")],
                description=(
                    "Requests still running on the old worker when its drain timed out: "
                    "leave_running = answered normally, reject = answered 503 + Retry-After."
                ),
            ),
            Panel(
                "Model versions (1 = holds the role)",
                [Query("max by (role, version) (model_info)", "", instant=True)],
                kind="table",
            ),
            Panel(
                "Model versions per line (policy, brief LLM)",
                [Query("max by (model, role, version) (model_line_info)", "", instant=True)],
                kind="table",
            ),
            Panel(
                "Reloads per line by result",
                [
                    Query(
                        f"sum by (model, result) (increase(model_line_reload_total[{RATE}]))",
                        "{{model}} {{result}}",
                    ),
                    Query(
                        "sum by (model) (increase("
                        f"model_line_reload_abandoned_loads_total[{RATE}]))",
                        "{{model}} abandoned loads (past its load timeout)",
                    ),
                ],
            ),
            Panel(
                "Requests past the drain timeout per line",
                [
                    Query(
                        "sum by (model, action) (increase("
                        f"model_line_drain_timeout_requests_total[{RATE}]))",
                        "{{model}} {{action}}",
                    )
                ],
                thresholds=[(1.0, "orange")],
                description=(
                    "Per model line (policy, brief_llm): requests still running on the old "
                    "worker when its drain timed out (a brief LLM generate can outlive it). "
                    "leave_running = answered normally, reject = answered 503 + Retry-After."
                ),
            ),
            Panel(
                "Reload phase p95 per line",
                [
                    Query(
                        "histogram_quantile(0.95, sum by (model, phase, le) "
                        f"(rate(model_line_reload_phase_seconds_bucket[{RATE}])))",
                        "{{model}} {{phase}}",
                    )
                ],
                unit="s",
            ),
        ),
    ),
)

ANNOTATIONS: Sequence[tuple[str, str, str]] = (
    (
        "Rollbacks",
        "sum by (reason, run_id) (changes(checkpoint_rollbacks_total[1m])) > 0",
        "red",
    ),
    ("Model reloads", "sum by (result) (changes(model_reload_total[1m])) > 0", "blue"),
)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int, height: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": panel.base_color, "value": None}]
    steps += [{"color": color, "value": value} for value, color in panel.thresholds]
    custom: dict[str, Any] = {}
    if panel.kind == "timeseries":
        custom = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "thresholdsStyle": {"mode": "line" if panel.thresholds or panel.overrides else "off"},
        }
    targets = [
        {
            "refId": chr(ord("A") + index),
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "instant": query.instant,
            "range": not query.instant,
            **({"format": "table"} if panel.kind == "table" else {}),
        }
        for index, query in enumerate(panel.queries)
    ]
    result: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                "custom": custom,
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": list(panel.overrides),
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if panel.kind == "timeseries"
        else {"showHeader": True},
        "targets": targets,
    }
    if panel.kind == "table" and len(panel.queries) > 1:
        result["transformations"] = [{"id": "merge", "options": {}}]
    return result


def build_dashboard() -> dict[str, Any]:
    """The dashboard as a Grafana classic JSON model (importable via POST /api/dashboards/db)."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for section, items in SECTIONS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": section,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x = 0
        for panel in items:
            height = 8
            if x + panel.width > 24:
                x = 0
                y += height
            panels.append(_panel_json(panel, panel_id, x, y, height))
            panel_id += 1
            x += panel.width
        y += 8
    annotations = [
        {
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }
    ]
    annotations += [
        {
            "datasource": DATASOURCE,
            "enable": True,
            "expr": expr,
            "iconColor": color,
            "name": name,
            "step": "60s",
            "titleFormat": name,
            "useValueForTime": False,
        }
        for name, expr, color in ANNOTATIONS
    ]
    return {
        "id": None,
        "uid": DASHBOARD_UID,
        "title": "lightning_fragrance operations",
        "description": "Generated from the metric catalogue: monitoring.dashboard module.",
        "tags": ["lightning_fragrance", "rl", "llm", "serving"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "links": [],
        "annotations": {"list": annotations},
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Prometheus",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                }
            ]
        },
        "panels": panels,
    }


def render_dashboard() -> str:
    """The committed file's exact text."""
    return json.dumps(build_dashboard(), indent=2) + "\n"


# ---------------------------------------------------------------------- checking

_FUNCTIONS_AND_KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
        "unless", "offset", "time", "inf", "nan",
    }
)  # fmt: skip
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric (or recording rule) names selected by a PromQL expression.

    Strips strings, label matchers ``{...}``, range selectors ``[...]`` and grouping lists
    ``by (...)``, then keeps identifiers that are not functions or keywords.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(0)
        following = text[match.end() :].lstrip()
        if following.startswith("(") or name in _FUNCTIONS_AND_KEYWORDS:
            continue
        names.add(name)
    return names


def load_recording_rules(path: Path = RECORDING_RULES_PATH) -> dict[str, str]:
    """Recording rule name -> expression, from a Prometheus rule file."""
    content = yaml.safe_load(path.read_text())
    return {
        rule["record"]: rule["expr"]
        for group in content.get("groups", [])
        for rule in group.get("rules", [])
        if "record" in rule
    }


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target, rows excluded."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel.get("type") != "row"
        for target in panel.get("targets", [])
    ]


def check_dashboard(
    dashboard: Mapping[str, Any],
    recording_rules: Mapping[str, str],
    catalogue: Iterable[str] = CATALOGUE,
) -> list[str]:
    """Problems between a dashboard and the catalogue; empty when they agree.

    A panel may select a catalogued series (``x``, ``x_bucket``...) or a recording rule whose
    own expression does. Every catalogued metric must be shown by at least one panel.
    """
    series = series_to_metric()
    problems: list[str] = []
    covered: set[str] = set()

    def resolve(name: str, where: str) -> None:
        if name in series:
            covered.add(series[name])
        elif name in recording_rules:
            for inner in metric_names(recording_rules[name]):
                resolve(inner, f"{where} via recording rule {name}")
        else:
            problems.append(f"{where}: queries {name!r}, which is neither catalogued nor recorded")

    for title, expr in dashboard_queries(dashboard):
        for name in metric_names(expr):
            resolve(name, f"panel {title!r}")
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            for name in metric_names(annotation["expr"]):
                resolve(name, f"annotation {annotation['name']!r}")
    for name in catalogue:
        if name not in covered:
            problems.append(f"metric {name!r} is catalogued but no panel shows it")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with --check, verify) the committed dashboard file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DASHBOARD_PATH)
    parser.add_argument(
        "--check", action="store_true", help="fail if the file is stale or inconsistent"
    )
    parser.add_argument(
        "--import-body",
        action="store_true",
        help="print the body of Grafana's POST /api/dashboards/db for this dashboard",
    )
    parser.add_argument("--folder-uid", default="", help="Grafana folder of the import")
    args = parser.parse_args(argv)
    if args.import_body:
        body: dict[str, Any] = {"dashboard": build_dashboard(), "overwrite": True}
        if args.folder_uid:
            body["folderUid"] = args.folder_uid  # without it an update moves it to the root
        print(json.dumps(body))
        return 0
    problems = check_dashboard(build_dashboard(), load_recording_rules())
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    text = render_dashboard()
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(
                f"{args.output} is stale: run python -m lightning_fragrance.monitoring.dashboard",
                file=sys.stderr,
            )
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(build_dashboard()['panels'])} panels and rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
