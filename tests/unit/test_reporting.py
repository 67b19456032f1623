"""The training report: metric history and the PNG with thresholds and rollback markers."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lightning_fragrance.reporting import (
    GuardThresholds,
    MetricHistory,
    ReportInputs,
    write_training_report,
)


def _history() -> MetricHistory:
    history = MetricHistory()
    for step in range(1, 41):
        kl = 500.0 if step == 21 else 0.08
        loss = math.nan if step == 22 else 0.05
        history.rows.append(
            {
                "step": float(step),
                "train/reward": 10 + step / 4,
                "train/loss": loss,
                "train/kl": kl,
            }
        )
    return history


def test_metric_history_series_and_json_keep_nan_as_null(tmp_path: Path) -> None:
    history = _history()
    steps, values = history.series("train/kl")
    assert steps[0] == 1 and values[20] == 500.0
    rows = json.loads(history.write_json(tmp_path / "m.json").read_text())
    assert rows[21]["train/loss"] is None
    assert rows[0]["train/kl"] == 0.08


def test_report_png_is_written_with_thresholds_rollbacks_and_faults(tmp_path: Path) -> None:
    inputs = ReportInputs(
        history=_history(),
        thresholds=GuardThresholds(kl_threshold=0.3, window=5),
        rollbacks=[{"at_step": 22, "to_step": 20, "reason": "kl_spike"}],
        faults=[{"step": 21, "kind": "lr_spike", "detail": "x100"}],
        reward_target=20.0,
        baselines={"random": 10.0, "heuristic": 19.3},
    )
    path = write_training_report(inputs, tmp_path / "nested" / "report.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # three panels with lines, not an empty canvas
