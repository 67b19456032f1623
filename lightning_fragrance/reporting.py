"""The training report: what happened in a run, as a metrics history and one PNG.

`MetricHistory` is a callback that keeps every logged `train/*` value per optimizer step (it is
independent of the logger, so the report works with CSV, Prometheus or no logger at all).
`write_training_report` draws reward, loss and KL over steps with the guard's thresholds as
lines, rollbacks as markers (arrow to the restored step) and injected faults as markers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class MetricHistory(Callback):
    """Record the logged metrics with a given prefix at every optimizer step.

    Args:
        prefix: Only keys starting with this are kept.

    Attributes:
        rows: One dict per step: ``{"step": int, "<key>": float, ...}``.
    """

    def __init__(self, prefix: str = "train/") -> None:
        self.prefix = prefix
        self.rows: list[dict[str, float]] = []

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        row: dict[str, float] = {"step": float(trainer.global_step)}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(self.prefix):
                row[key] = float(value)
        if self.rows and self.rows[-1]["step"] == row["step"]:
            self.rows[-1] = row  # no optimizer step on this batch (accumulation)
        else:
            self.rows.append(row)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of one metric (steps where it was logged)."""
        points = [(r["step"], r[key]) for r in self.rows if key in r]
        if not points:
            return np.zeros(0), np.zeros(0)
        steps, values = zip(*points, strict=True)
        return np.asarray(steps), np.asarray(values)

    def write_json(self, path: str | Path) -> Path:
        """Write the rows as JSON (non-finite values as null) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        clean = [
            {k: (v if math.isfinite(v) else None) for k, v in row.items()} for row in self.rows
        ]
        path.write_text(json.dumps(clean, indent=1))
        return path


@dataclass(frozen=True)
class GuardThresholds:
    """The rollback guard's settings, as far as the report draws them.

    Attributes:
        kl_threshold: KL above this triggers.
        loss_increase_multiplier: |loss| above this x |baseline| triggers.
        reward_drop_threshold: A reward drop of more than this fraction triggers.
        window: Healthy steps in the baseline window (trailing median in the plot).
        min_baseline_magnitude: Floor of |baseline|.
    """

    kl_threshold: float = 0.03
    loss_increase_multiplier: float = 2.0
    reward_drop_threshold: float = 0.3
    window: int = 20
    min_baseline_magnitude: float = 1e-3

    @classmethod
    def from_callback(cls, callback: Any) -> GuardThresholds:
        """Read them from a `RollbackCheckpoint` (its `conditions`)."""
        c = callback.conditions
        return cls(
            c.kl_threshold,
            c.loss_increase_multiplier,
            c.reward_drop_threshold,
            c.window,
            c.min_baseline_magnitude,
        )


@dataclass
class ReportInputs:
    """Everything the report draws."""

    history: MetricHistory
    thresholds: GuardThresholds | None = None
    rollbacks: Sequence[Mapping[str, Any]] = field(default_factory=list)
    faults: Sequence[Mapping[str, Any]] = field(default_factory=list)
    reward_target: float | None = None
    baselines: Mapping[str, float] = field(default_factory=dict)
    title: str = "Training report"


def _trailing_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median of the previous `window` finite values at each position (NaN before any)."""
    out = np.full(values.shape, np.nan)
    for i in range(len(values)):
        past = values[max(0, i - window) : i]
        past = past[np.isfinite(past)]
        if past.size:
            out[i] = np.median(past)
    return out


def write_training_report(inputs: ReportInputs, path: str | Path) -> Path:
    """Draw the report PNG and return its path.

    Panels: reward (with the reward-drop line under the trailing median, the target and the
    baselines), loss (with the loss-spike line) and KL (with the KL threshold). Rollbacks are red
    markers with an arrow to the restored step; faults are orange markers.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display (CI, servers)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    history, th = inputs.history, inputs.thresholds
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    panels = [("train/reward", "reward"), ("train/loss", "loss"), ("train/kl", "KL (k3)")]
    for ax, (key, label) in zip(axes, panels, strict=True):
        steps, values = history.series(key)
        shown = np.where(np.isfinite(values), values, np.nan)
        ax.plot(steps, shown, color="tab:blue", lw=1.2, label=label)
        bad = ~np.isfinite(values)
        if bad.any():
            ax.scatter(steps[bad], np.zeros(bad.sum()), marker="x", color="black", label="NaN")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if th is not None and steps.size:
            median = _trailing_median(values, th.window)
            if key == "train/reward":
                line = median - th.reward_drop_threshold * np.maximum(
                    np.abs(median), th.min_baseline_magnitude
                )
                label_text = f"reward-drop line ({th.reward_drop_threshold:.0%} under median)"
                ax.plot(steps, line, "--", color="tab:red", lw=1, label=label_text)
            elif key == "train/loss":
                line = th.loss_increase_multiplier * np.maximum(
                    np.abs(median), th.min_baseline_magnitude
                )
                label_text = f"loss-spike line ({th.loss_increase_multiplier:g}x |median|)"
                ax.plot(steps, line, "--", color="tab:red", lw=1, label=label_text)
                finite = values[np.isfinite(values)]
                if finite.size:  # keep the healthy range readable next to a spike
                    low, high = np.percentile(finite, [1, 99])
                    pad = max(high - low, 1e-3)
                    ax.set_ylim(min(low, -np.nanmax(line)) - pad, max(high, np.nanmax(line)) + pad)
            else:
                ax.axhline(
                    th.kl_threshold,
                    ls="--",
                    color="tab:red",
                    lw=1,
                    label=f"kl_threshold {th.kl_threshold:g}",
                )
                positive = values[np.isfinite(values) & (values > 0)]
                if positive.size:  # k3 is never negative: a log axis shows healthy and spike
                    ax.set_yscale("log")
                    ax.set_ylim(bottom=min(positive.min(), th.kl_threshold) / 2)
        if key == "train/reward":
            if inputs.reward_target is not None:
                ax.axhline(
                    inputs.reward_target,
                    color="tab:green",
                    lw=1,
                    ls=":",
                    label=f"target {inputs.reward_target:g}",
                )
            colors = ["grey", "tab:purple", "tab:brown"]
            for (name, value), color in zip(inputs.baselines.items(), colors, strict=False):
                ax.axhline(value, color=color, lw=1, ls="-.", label=f"{name} {value:.1f}")
        for event in inputs.rollbacks:
            at, to = event.get("at_step"), event.get("to_step")
            ax.axvline(at, color="tab:red", lw=1.5, alpha=0.8)
            if to is not None:
                ax.axvspan(to, at, color="tab:red", alpha=0.08)
        for fault in inputs.faults:
            ax.axvline(fault["step"], color="tab:orange", lw=1.5, ls=":")
        ax.legend(loc="best", fontsize=7)
    top = axes[0]
    for event in inputs.rollbacks:
        top.annotate(
            f"rollback -> step {event.get('to_step')}\n({event.get('reason')})",
            xy=(event.get("at_step", 0), 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="tab:red",
            va="top",
            ha="left",
        )
    for fault in inputs.faults:
        top.annotate(
            f"fault: {fault['kind']}",
            xy=(fault["step"], 0.02),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="tab:orange",
            ha="right",
        )
    axes[-1].set_xlabel("step (PPO update)")
    fig.suptitle(inputs.title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
