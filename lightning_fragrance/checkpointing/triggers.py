"""Divergence triggers: pure functions of a step's metrics and a baseline.

No I/O and no state beyond the small `TriggerMonitor` (window and patience), so every rule is
unit-tested with plain numbers.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Mapping

from lightning_fragrance.checkpointing.conditions import BaselineMode, RollbackConditions
from lightning_fragrance.checkpointing.records import Trigger
from lightning_fragrance.labels import RollbackReason

LOSS = "loss"
REWARD = "reward"
KL = "kl_divergence"
GRAD_NORM = "grad_norm"
SIGNALS = (LOSS, REWARD, KL, GRAD_NORM)
"""Metric names the triggers read; other metrics are carried along but not judged."""


def _magnitude(value: float, floor: float) -> float:
    return max(abs(value), floor)


def evaluate_step(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float] | None,
    conditions: RollbackConditions,
) -> Trigger | None:
    """Judge one step.

    Args:
        metrics: This step's values (`SIGNALS` keys; missing ones are not judged).
        baseline: Values to compare loss, reward and grad norm with, or None (warm-up, or no
            checkpoint yet): then only the non-finite and absolute KL rules apply.
        conditions: Thresholds.

    Returns:
        The first rule that fires, in the order non-finite, KL, loss, reward, grad norm; or None.
    """
    for name in SIGNALS:
        value = metrics.get(name)
        if value is not None and not math.isfinite(value):
            return Trigger(RollbackReason.NON_FINITE, f"non-finite {name}={value}", name, value)

    kl = metrics.get(KL)
    if kl is not None and kl > conditions.kl_threshold:
        message = f"KL spike {kl:.4f} > kl_threshold {conditions.kl_threshold:.4f}"
        return Trigger(RollbackReason.KL_SPIKE, message, KL, kl)
    if baseline is None:
        return None

    floor = conditions.min_baseline_magnitude
    loss, base_loss = metrics.get(LOSS), baseline.get(LOSS)
    if loss is not None and base_loss is not None:
        # Compare magnitudes: PPO surrogate losses change sign (DESIGN.md §5).
        ratio = abs(loss) / _magnitude(base_loss, floor)
        if ratio > conditions.loss_increase_multiplier:
            message = f"loss spike {base_loss:.2f} -> {loss:.2f} ({ratio:.2f}x)"
            return Trigger(RollbackReason.LOSS_SPIKE, message, LOSS, loss, base_loss)

    reward, base_reward = metrics.get(REWARD), baseline.get(REWARD)
    if reward is not None and base_reward is not None:
        drop = (base_reward - reward) / _magnitude(base_reward, floor)
        if drop > conditions.reward_drop_threshold:
            message = (
                f"reward drop {base_reward:.2f} -> {reward:.2f} ({drop:.0%} > "
                f"reward_drop_threshold {conditions.reward_drop_threshold:.0%})"
            )
            return Trigger(RollbackReason.REWARD_DROP, message, REWARD, reward, base_reward)

    grad, base_grad = metrics.get(GRAD_NORM), baseline.get(GRAD_NORM)
    threshold = conditions.grad_norm_threshold
    if threshold is not None and grad is not None and base_grad is not None:
        ratio = abs(grad) / _magnitude(base_grad, floor)
        if ratio > threshold:
            message = f"grad-norm spike {base_grad:.2f} -> {grad:.2f} ({ratio:.2f}x > {threshold}x)"
            return Trigger(RollbackReason.GRAD_NORM, message, GRAD_NORM, grad, base_grad)
    return None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Outcome of `TriggerMonitor.observe` for one step.

    ``bad`` is the rule that fired on this step (if any); ``fire`` is True once ``patience``
    consecutive bad steps (or one non-finite step) were seen: then the caller acts.
    """

    bad: Trigger | None
    fire: bool
    streak: int


class TriggerMonitor:
    """Window of healthy values and the patience counter around `evaluate_step`.

    Bad steps never enter the window, so a spike cannot poison its own baseline (OLMo-core's
    NaN-in-the-window bug skipped 129 healthy steps, research note §1.5).
    """

    def __init__(self, conditions: RollbackConditions) -> None:
        self.conditions = conditions
        self._window: dict[str, deque[float]] = {
            name: deque(maxlen=conditions.window) for name in SIGNALS
        }
        self._streak = 0

    @property
    def uses_window(self) -> bool:
        """Whether baselines come from the window rather than from a checkpoint."""
        return self.conditions.baseline == BaselineMode.WINDOW_MEDIAN.value

    def window_baseline(self) -> dict[str, float] | None:
        """Median per signal of the healthy window, or None during warm-up (window not full)."""
        full = {n: v for n, v in self._window.items() if len(v) >= self.conditions.window}
        if not full:
            return None
        return {name: float(statistics.median(values)) for name, values in full.items()}

    def observe(
        self, metrics: Mapping[str, float], checkpoint_baseline: Mapping[str, float] | None
    ) -> Verdict:
        """Judge a step and update window and patience.

        Args:
            metrics: This step's values.
            checkpoint_baseline: Metrics of the current rollback target (used in "checkpoint"
                mode; ignored in "window_median" mode).
        """
        baseline = self.window_baseline() if self.uses_window else checkpoint_baseline
        bad = evaluate_step(metrics, baseline, self.conditions)
        if bad is None:
            self._streak = 0
            for name in SIGNALS:
                if name in metrics:
                    self._window[name].append(float(metrics[name]))
            return Verdict(None, False, 0)
        self._streak += 1
        fire = bad.reason is RollbackReason.NON_FINITE or self._streak >= self.conditions.patience
        return Verdict(bad, fire, self._streak)

    def reset_streak(self) -> None:
        """Forget the current run of bad steps (after a rollback)."""
        self._streak = 0

    def state_dict(self) -> dict[str, object]:
        """Window and streak, as lists (weights_only-safe)."""
        return {"window": {n: list(v) for n, v in self._window.items()}, "streak": self._streak}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Inverse of `state_dict`."""
        window = state.get("window", {})
        assert isinstance(window, Mapping)
        for name in SIGNALS:
            self._window[name] = deque(
                (float(v) for v in window.get(name, [])), maxlen=self.conditions.window
            )
        streak = state.get("streak", 0)
        self._streak = int(streak) if isinstance(streak, (int, float)) else 0
