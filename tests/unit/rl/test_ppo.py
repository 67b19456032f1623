"""The PPO LightningModule: logged statistics, learning, checkpoints, autoreset and errors.

Every test runs a real `Trainer.fit` or real rollouts on real Gymnasium environments, with tiny
networks and budgets.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_fragrance.rl import PPO, NonFiniteActionError
from lightning_fragrance.rl.rollout import k3_kl

FRAGRANCE = "lightning_fragrance.fragrance:FragranceFormulation-v0"


def _trainer(max_steps: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )


class _RecordPolicyBeforeEachStep(pl.Callback):
    """Copies the policy right before every optimizer step of the update."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.snapshots.append(copy.deepcopy(pl_module.policy_net.state_dict()))


@pytest.mark.parametrize(
    ("env_id", "lr"),
    [("CartPole-v1", 0.05), (FRAGRANCE, 0.01)],
    ids=["discrete", "box"],
)
def test_logged_kl_clip_fraction_and_entropy_equal_a_direct_computation(
    env_id: str, lr: float
) -> None:
    # One minibatch = the whole rollout, two epochs: two optimizer steps on the same batch. A
    # large learning rate makes the second step's ratios leave the clip range.
    torch.manual_seed(0)
    module = PPO(
        env_id=env_id,
        num_envs=4,
        rollout_steps=16,
        minibatch_size=64,
        update_epochs=2,
        learning_rate=lr,
        hidden_sizes=[16],
    )
    recorder = _RecordPolicyBeforeEachStep()
    trainer = _trainer(1, [recorder])
    trainer.fit(module)
    assert module.last_rollout is not None
    batch = module.last_rollout.flat()
    assert len(recorder.snapshots) == 2

    probe = copy.deepcopy(module.policy_net)
    fractions, entropies = [], []
    with torch.no_grad():
        for state in recorder.snapshots:
            probe.load_state_dict(state)
            dist = probe.distribution(batch["observations"])
            log_ratio = dist.log_prob(batch["actions"]) - batch["log_probs"]
            fractions.append(((log_ratio.exp() - 1).abs() > 0.2).float().mean())
            entropies.append(dist.entropy().mean())
        final_logp = module.policy_net.distribution(batch["observations"]).log_prob(
            batch["actions"]
        )
        ratio = (final_logp - batch["log_probs"]).exp()
        direct_kl = ((ratio - 1) - ratio.log()).mean()

    logged = trainer.callback_metrics
    assert fractions[1] > 0, "the test needs a step whose ratios leave the clip range"
    torch.testing.assert_close(logged["train/clip_fraction"], torch.stack(fractions).mean())
    torch.testing.assert_close(logged["train/entropy"], torch.stack(entropies).mean())
    torch.testing.assert_close(logged["train/kl"], direct_kl)
    torch.testing.assert_close(logged["train/kl"], k3_kl(final_logp, batch["log_probs"]))
    assert logged["train/kl"] > 0


def test_short_fragrance_run_improves_mean_reward_over_its_start() -> None:
    torch.manual_seed(0)
    module = PPO(
        env_id=FRAGRANCE,
        num_envs=16,
        rollout_steps=8,
        minibatch_size=64,
        update_epochs=4,
        learning_rate=3e-4,
        hidden_sizes=[64, 64],
        normalize_observations=False,
        normalize_rewards=True,
        seed=1,
    )
    rewards: list[float] = []

    class Rewards(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            rewards.append(float(trainer.callback_metrics["train/reward"]))

    _trainer(20, [Rewards()]).fit(module)
    start, end = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert end > start + 2.0, f"reward went {start:.2f} -> {end:.2f}"


def test_one_training_step_is_one_global_step_whatever_the_minibatch_count() -> None:
    module = PPO(
        env_id="CartPole-v1",
        num_envs=2,
        rollout_steps=16,
        minibatch_size=8,
        update_epochs=3,
        hidden_sizes=[8],
    )
    trainer = _trainer(2)
    trainer.fit(module)
    assert trainer.global_step == 2
    optimizer = trainer.optimizers[0]
    adam_steps = {int(s["step"]) for s in optimizer.state.values()}
    assert adam_steps == {2 * 3 * (32 // 8)}  # updates x epochs x minibatches


def test_target_kl_ends_the_update_early_and_it_still_counts_as_one_step() -> None:
    module = PPO(
        env_id="CartPole-v1",
        num_envs=2,
        rollout_steps=16,
        minibatch_size=8,
        update_epochs=4,
        learning_rate=0.05,
        target_kl=1e-6,
        hidden_sizes=[8],
    )
    trainer = _trainer(2)
    trainer.fit(module)
    assert trainer.global_step == 2
    adam_steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert adam_steps == {2}  # one minibatch step per update instead of 4 epochs x 4


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_same_policy(tmp_path: Path) -> None:
    module = PPO(
        env_id=FRAGRANCE,
        num_envs=4,
        rollout_steps=8,
        minibatch_size=32,
        hidden_sizes=[16],
        normalize_observations=True,
    )
    trainer = _trainer(2)
    trainer.fit(module)
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["action_dim"] == module.spec.action_dim
    assert checkpoint["state_dict"]["policy_net.obs_normalizer.count"] > 1
    rebuilt = PPO.policy_from_checkpoint(str(path))
    obs = torch.rand(5, module.spec.observation_dim)
    torch.testing.assert_close(rebuilt(obs), module.policy_net.eval()(obs))


def test_hydra_style_containers_are_stored_as_plain_hyperparameters() -> None:
    from omegaconf import OmegaConf

    module = PPO(
        env_id="CartPole-v1",
        env_kwargs=OmegaConf.create({}),  # type: ignore[arg-type]
        num_envs=2,
        rollout_steps=8,
        minibatch_size=8,
        hidden_sizes=OmegaConf.create([8, 8]),  # type: ignore[arg-type]
    )
    assert module.hparams["hidden_sizes"] == [8, 8]
    assert type(module.hparams["env_kwargs"]) is dict


def test_same_step_autoreset_bootstraps_truncated_episodes_only() -> None:
    torch.manual_seed(0)
    module = PPO(
        env_id="CartPole-v1",
        env_kwargs={"max_episode_steps": 5},
        num_envs=2,
        rollout_steps=12,
        minibatch_size=8,
        hidden_sizes=[8],
        gamma=0.9,
    )
    rollout, finished = module.collect_rollout()
    dones = rollout.dones[:, 0]
    truncated_steps = torch.nonzero(dones).flatten().tolist()
    assert truncated_steps[:2] == [4, 9]  # every 5th step, with no wasted reset step between
    for t in range(12):
        if t in truncated_steps:
            # reward 1 + gamma * V(final observation): the episode was cut, not ended
            assert rollout.rewards[t, 0].item() != pytest.approx(1.0)
        else:
            assert rollout.rewards[t, 0].item() == pytest.approx(1.0)
    # The observation after a cut is the new episode's first one (CartPole resets near 0).
    assert rollout.observations[5, 0].abs().max() <= 0.05
    assert finished[:2] == [5.0, 5.0]


def test_diverged_policy_stops_the_rollout_with_an_actionable_error() -> None:
    module = PPO(env_id=FRAGRANCE, num_envs=2, rollout_steps=4, minibatch_size=8, hidden_sizes=[8])
    with torch.no_grad():
        for parameter in module.policy_net.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(NonFiniteActionError, match="RollbackCheckpoint"):
        module.collect_rollout()


def test_unsupported_spaces_and_oversized_minibatches_are_rejected() -> None:
    with pytest.raises(ValueError, match="FlattenObservation"):
        PPO(env_id="Blackjack-v1")
    with pytest.raises(ValueError, match="minibatch_size=64 exceeds"):
        PPO(env_id="CartPole-v1", num_envs=2, rollout_steps=8, minibatch_size=64)
