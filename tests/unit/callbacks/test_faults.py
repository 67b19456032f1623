"""`FaultInjection`: each fault happens at the chosen step, once, in a real `Trainer.fit`."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_fragrance.callbacks import FaultInjection
from lightning_fragrance.rl import PPO


def _ppo(env_id: str = "CartPole-v1") -> PPO:
    torch.manual_seed(0)
    return PPO(
        env_id=env_id,
        num_envs=2,
        rollout_steps=16,
        minibatch_size=16,
        update_epochs=1,
        hidden_sizes=[8],
        learning_rate=1e-3,
    )


class _Watch(pl.Callback):
    """Records, per step, the learning rate, the reward scale and the logged metrics."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.rows.append(
            {
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "scale": pl_module.reward_scale,
                **{k: float(v) for k, v in trainer.callback_metrics.items()},
            }
        )


def _fit(fault: FaultInjection, steps: int, env_id: str = "CartPole-v1") -> _Watch:
    watch = _Watch()
    pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[fault, watch],
    ).fit(_ppo(env_id))
    return watch


def test_lr_spike_multiplies_every_learning_rate_once_at_the_chosen_step() -> None:
    fault = FaultInjection(kind="lr_spike", at_step=2, lr_factor=100.0)
    watch = _fit(fault, 4)
    assert [row["lr"] for row in watch.rows] == pytest.approx([1e-3, 1e-3, 0.1, 0.1])
    assert [e["step"] for e in fault.events] == [2]


def test_reward_flip_negates_the_learner_reward_for_its_duration_then_restores_it() -> None:
    fault = FaultInjection(kind="reward_flip", at_step=1, duration=2)
    # One-step episodes: every logged reward comes from a rollout entirely before/in the flip.
    watch = _fit(fault, 5, "lightning_fragrance.fragrance:FragranceFormulation-v0")
    assert [row["scale"] for row in watch.rows] == [1.0, -1.0, -1.0, 1.0, 1.0]
    rewards = [row["train/reward"] for row in watch.rows]
    assert rewards[1] < 0 and rewards[2] < 0
    assert rewards[0] > 0 and rewards[3] > 0 and rewards[4] > 0


def test_nan_grad_makes_that_steps_gradient_norm_non_finite() -> None:
    fault = FaultInjection(kind="nan_grad", at_step=1)
    recorder = _Watch()
    module = _ppo()
    pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[fault, recorder],
    ).fit(module)
    assert math.isfinite(recorder.rows[0]["train/grad_norm"])
    assert math.isnan(recorder.rows[1]["train/grad_norm"])
    assert not all(torch.isfinite(p).all() for p in module.policy_net.parameters())


class _NoRewardScale(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)


def test_reward_flip_on_a_module_without_reward_scale_is_rejected_at_setup() -> None:
    fault = FaultInjection(kind="reward_flip")
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(TypeError, match="reward_scale"):
        fault.setup(trainer, _NoRewardScale(), "fit")


def test_invalid_fault_arguments_are_rejected_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="lr_spike"):
        FaultInjection(kind="meteor")
    with pytest.raises(ValueError, match="at_step"):
        FaultInjection(at_step=-1)
    with pytest.raises(ValueError, match="duration"):
        FaultInjection(kind="reward_flip", duration=0)


def test_disabled_fault_changes_nothing() -> None:
    fault = FaultInjection(kind="lr_spike", at_step=0, enabled=False)
    watch = _fit(fault, 2)
    assert [row["lr"] for row in watch.rows] == pytest.approx([1e-3, 1e-3])
    assert fault.events == []
