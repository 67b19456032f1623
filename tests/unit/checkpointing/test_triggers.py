"""Trigger rules at their thresholds, non-finite values, window baselines and patience."""

from __future__ import annotations

import math

import pytest

from lightning_fragrance.checkpointing import (
    RollbackConditions,
    RollbackReason,
    TriggerMonitor,
    evaluate_step,
)

GUIDE = RollbackConditions()
BASE = {"loss": 0.5, "reward": 20.0, "kl_divergence": 0.01}


def reason(metrics: dict[str, float], baseline: dict[str, float] | None = BASE) -> str | None:
    trigger = evaluate_step(metrics, baseline, GUIDE)
    return None if trigger is None else trigger.reason.value


def test_kl_fires_just_above_threshold_and_not_at_it() -> None:
    assert reason({"kl_divergence": 0.03}) is None
    assert reason({"kl_divergence": 0.0300001}) == RollbackReason.KL_SPIKE.value


def test_kl_is_absolute_and_fires_without_any_checkpoint() -> None:
    assert reason({"kl_divergence": 0.5}, baseline=None) == "kl_spike"
    assert reason({"loss": 100.0}, baseline=None) is None


def test_loss_fires_above_multiplier_times_checkpoint_loss_and_not_at_it() -> None:
    assert reason({"loss": 1.0}) is None
    assert reason({"loss": 1.0000001}) == "loss_spike"


def test_reward_fires_when_drop_exceeds_fraction_and_not_at_it() -> None:
    assert reason({"reward": 14.0}) is None  # exactly 30 % down
    assert reason({"reward": 13.999}) == "reward_drop"
    assert reason({"reward": 30.0}) is None  # a rise is never a drop


def test_guide_scenario_messages() -> None:
    assert reason({"loss": 0.45, "reward": 22.0}) is None
    trigger = evaluate_step({"loss": 1.2, "reward": 18.0}, BASE, GUIDE)
    assert trigger is not None
    assert trigger.message == "loss spike 0.50 -> 1.20 (2.40x)"


@pytest.mark.parametrize("name", ["loss", "reward", "kl_divergence", "grad_norm"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_always_trigger(name: str, value: float) -> None:
    trigger = evaluate_step({name: value}, None, GUIDE)
    assert trigger is not None and trigger.reason is RollbackReason.NON_FINITE
    assert name in trigger.message


def test_negative_baselines_compare_by_magnitude() -> None:
    # PPO surrogate losses are negative: -0.5 -> -1.2 is a 2.4x jump in magnitude.
    assert reason({"loss": -1.2}, {"loss": -0.5}) == "loss_spike"
    assert reason({"loss": -0.9}, {"loss": -0.5}) is None
    # Reward -10 -> -14 is a 40 % drop relative to |baseline|.
    assert reason({"reward": -14.0}, {"reward": -10.0}) == "reward_drop"
    assert reason({"reward": -12.0}, {"reward": -10.0}) is None


def test_baseline_near_zero_uses_the_floor() -> None:
    conditions = RollbackConditions(min_baseline_magnitude=0.1)
    # Without the floor 0.05 / 1e-9 would be a huge ratio.
    assert evaluate_step({"loss": 0.15}, {"loss": 1e-9}, conditions) is None
    assert evaluate_step({"loss": 0.25}, {"loss": 1e-9}, conditions) is not None


def test_grad_norm_trigger_is_off_by_default_and_fires_above_its_multiple() -> None:
    assert reason({"grad_norm": 1e6}, {"grad_norm": 1.0}) is None
    conditions = RollbackConditions(grad_norm_threshold=10.0)
    assert evaluate_step({"grad_norm": 10.0}, {"grad_norm": 1.0}, conditions) is None
    fired = evaluate_step({"grad_norm": 10.5}, {"grad_norm": 1.0}, conditions)
    assert fired is not None and fired.reason is RollbackReason.GRAD_NORM


def test_patience_needs_consecutive_bad_steps() -> None:
    monitor = TriggerMonitor(RollbackConditions(patience=3))
    bad, good = {"loss": 5.0}, {"loss": 0.5}
    fires = [monitor.observe(m, BASE).fire for m in (bad, bad, good, bad, bad, bad)]
    assert fires == [False, False, False, False, False, True]


def test_non_finite_ignores_patience() -> None:
    monitor = TriggerMonitor(RollbackConditions(patience=5))
    assert monitor.observe({"loss": math.nan}, BASE).fire


def test_window_median_baseline_warms_up_and_ignores_one_outlier() -> None:
    conditions = RollbackConditions(baseline="window_median", window=5)
    monitor = TriggerMonitor(conditions)
    # Warm-up: the window is not full, relative triggers are silent.
    for loss in (1.0, 1.1, 0.9, 1.0):
        assert not monitor.observe({"loss": loss}, None).fire
    assert monitor.window_baseline() is None
    assert not monitor.observe({"loss": 1.05}, None).fire
    assert monitor.window_baseline() == {"loss": 1.0}
    # 2.1 > 2 x median(1.0): fires, and is kept out of the window.
    assert monitor.observe({"loss": 2.1}, None).fire
    assert monitor.window_baseline() == {"loss": 1.0}
    assert not monitor.observe({"loss": 1.9}, None).fire


def test_window_mode_ignores_the_checkpoint_baseline() -> None:
    monitor = TriggerMonitor(RollbackConditions(baseline="window_median", window=2))
    assert not monitor.observe({"loss": 5.0}, {"loss": 0.1}).fire


def test_monitor_state_round_trips() -> None:
    conditions = RollbackConditions(baseline="window_median", window=3, patience=2)
    monitor = TriggerMonitor(conditions)
    for loss in (1.0, 2.0, 3.0, 50.0):
        monitor.observe({"loss": loss}, None)
    copy = TriggerMonitor(conditions)
    copy.load_state_dict(monitor.state_dict())
    assert copy.window_baseline() == monitor.window_baseline()
    assert copy.observe({"loss": 50.0}, None).fire  # streak carried over: 2nd bad step


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"kl_threshold": 0}, "kl_threshold"),
        ({"loss_increase_multiplier": 1.0}, "loss_increase_multiplier"),
        ({"reward_drop_threshold": -0.1}, "reward_drop_threshold"),
        ({"baseline": "ema"}, "baseline"),
        ({"patience": 0}, "patience"),
        ({"window": 0}, "window"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"grad_norm_threshold": 0.5}, "grad_norm_threshold"),
    ],
)
def test_invalid_conditions_name_the_parameter(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RollbackConditions(**kwargs)  # type: ignore[arg-type]
