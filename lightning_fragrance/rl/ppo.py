"""`PPO`: proximal policy optimisation as a LightningModule, for any Gymnasium environment with a
flat `Box` observation and a `Discrete` or `Box` action.

One `training_step` is one PPO update: a vectorised rollout, GAE, then `update_epochs` passes of
minibatch steps on the clipped surrogate, value loss and entropy bonus, with gradient clipping.
`trainer.global_step` counts updates (one per `training_step`), so `max_steps`, checkpoint
intervals and fault steps all mean "PPO updates". Logged every update: `train/policy_loss`,
`train/value_loss`, `train/loss`, `train/reward` (mean return of episodes finished in the
rollout), `train/entropy`, `train/clip_fraction`, `train/kl` (k3 between the rollout policy and
the updated one), `train/grad_norm` (pre-clip, mean over minibatches).

The actor and the critic are separate networks, `policy_net` and `value_net` (the operations
guide's names), sharing one Adam optimiser. Observation and reward statistics are registered
buffers inside them / this module, so checkpoints, rollbacks and exports carry them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import lightning.pytorch as pl
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import Tensor
from torch.distributions import Categorical, Distribution, Independent
from torch.utils.data import Dataset

from lightning_fragrance.rl.networks import (
    PolicyNetwork,
    PolicySpec,
    RunningMeanStd,
    ValueNetwork,
)
from lightning_fragrance.rl.rollout import (
    Rollout,
    clip_fraction,
    clipped_surrogate,
    compute_gae,
    k3_kl,
)


@dataclass(frozen=True)
class PPOConfig:
    """The training settings of a `PPO` module (see its docstring), all primitives."""

    env_id: str
    env_kwargs: dict[str, Any]
    num_envs: int
    rollout_steps: int
    update_epochs: int
    minibatch_size: int
    learning_rate: float
    gamma: float
    gae_lambda: float
    clip_coef: float
    ent_coef: float
    vf_coef: float
    max_grad_norm: float
    target_kl: float | None
    normalize_rewards: bool
    normalize_advantages: bool
    updates_per_epoch: int
    seed: int
    log_on_epoch: bool = False


class NonFiniteActionError(RuntimeError):
    """The policy produced NaN or infinite actions: its parameters have diverged."""


class _UpdateIndex(Dataset[int]):
    """A dataset of `length` dummy items: each item drives one PPO update.

    PPO makes its own data; Lightning only needs something to iterate. A finite length gives the
    progress bar an epoch of known size.
    """

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


def make_vector_env(
    env_id: str, num_envs: int, env_kwargs: dict[str, Any] | None = None
) -> gym.vector.VectorEnv:
    """A synchronous vector env in SAME_STEP autoreset mode.

    Gymnasium 1.x defaults to NEXT_STEP autoreset, where the step after an episode's end is a
    reset step whose action is ignored; for a one-step task that wastes half of every rollout.
    In SAME_STEP mode the returned observation is already the next episode's first one and the
    final observation is in `info["final_obs"]`.
    """
    return gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
        **(env_kwargs or {}),
    )


def policy_spec_for_env(
    env_id: str,
    env_kwargs: dict[str, Any] | None,
    hidden_sizes: list[int],
    activation: str,
    init_log_std: float,
    normalize_observations: bool,
) -> PolicySpec:
    """Read the spaces of `env_id` and describe the matching policy.

    Raises:
        ValueError: For observation or action spaces PPO here does not support.
    """
    probe = gym.make(env_id, **(env_kwargs or {}))
    try:
        obs_space, act_space = probe.observation_space, probe.action_space
    finally:
        probe.close()
    if not isinstance(obs_space, gym.spaces.Box):
        raise ValueError(
            f"{env_id} has a {type(obs_space).__name__} observation space; PPO needs a Box "
            "(wrap it, e.g. with gymnasium.wrappers.FlattenObservation)"
        )
    obs_dim = int(np.prod(obs_space.shape))
    if isinstance(act_space, gym.spaces.Discrete):
        return PolicySpec(
            obs_dim,
            "discrete",
            int(act_space.n),
            [],
            [],
            hidden_sizes,
            activation,
            init_log_std,
            normalize_observations,
        )
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return PolicySpec(
            obs_dim,
            "box",
            int(act_space.shape[0]),
            [float(v) for v in act_space.low],
            [float(v) for v in act_space.high],
            hidden_sizes,
            activation,
            init_log_std,
            normalize_observations,
        )
    raise ValueError(
        f"{env_id} has action space {act_space}; PPO supports Discrete and 1-D Box actions"
    )


class PPO(pl.LightningModule):
    """Proximal policy optimisation on a Gymnasium environment.

    Args:
        env_id: A registered Gymnasium id ("CartPole-v1", or "module:Id" to import first, e.g.
            "lightning_fragrance.fragrance:FragranceFormulation-v0").
        env_kwargs: Keyword arguments for `gymnasium.make` (primitives only).
        num_envs: Environments stepped together in a rollout.
        rollout_steps: Vector steps per rollout (batch = num_envs * rollout_steps).
        update_epochs: Passes over the rollout per update.
        minibatch_size: Samples per gradient step.
        learning_rate: Adam learning rate (actor and critic).
        gamma: Discount factor.
        gae_lambda: GAE lambda.
        clip_coef: PPO clipping range epsilon.
        ent_coef: Entropy bonus coefficient.
        vf_coef: Value loss coefficient (in `train/loss`; the nets have separate parameters).
        max_grad_norm: Each network's gradient is clipped to this norm.
        target_kl: Stop the update's remaining epochs when the minibatch k3 KL exceeds
            1.5 x this (SB3); None disables the early stop.
        hidden_sizes: Widths of the hidden layers of both networks.
        activation: "tanh", "relu" or "gelu".
        init_log_std: Initial log std of a Gaussian policy.
        normalize_observations: Keep running observation statistics (buffers) and normalise.
        normalize_rewards: Scale rewards by the running std of the discounted return (buffer),
            so the value loss is O(1) whatever the reward scale.
        normalize_advantages: Standardise advantages per minibatch.
        updates_per_epoch: Updates per Lightning epoch (the progress bar, and the span of an
            epoch-level metric with ``log_on_epoch``).
        seed: Seeds the environments.
        log_on_epoch: Log the training metrics once per epoch (``on_epoch=True``: the mean over
            its updates) instead of once per update, as many RL examples do; the rollback
            guard then judges them at each epoch's end.
    """

    def __init__(
        self,
        env_id: str = "CartPole-v1",
        env_kwargs: dict[str, Any] | None = None,
        num_envs: int = 8,
        rollout_steps: int = 128,
        update_epochs: int = 4,
        minibatch_size: int = 256,
        learning_rate: float = 2.5e-4,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_coef: float = 0.2,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        target_kl: float | None = None,
        hidden_sizes: list[int] | tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        init_log_std: float = -0.5,
        normalize_observations: bool = True,
        normalize_rewards: bool = False,
        normalize_advantages: bool = True,
        updates_per_epoch: int = 10,
        seed: int = 0,
        log_on_epoch: bool = False,
    ) -> None:
        super().__init__()
        env_kwargs = _plain(env_kwargs or {})
        hidden = [int(h) for h in hidden_sizes]
        spec = policy_spec_for_env(
            env_id, env_kwargs, hidden, activation, init_log_std, normalize_observations
        )
        batch = num_envs * rollout_steps
        if minibatch_size > batch:
            raise ValueError(
                f"minibatch_size={minibatch_size} exceeds the rollout batch "
                f"num_envs*rollout_steps={batch}; lower it or collect more"
            )
        # Explicit primitive hparams (lists, not tuples or OmegaConf containers) so a checkpoint
        # loads with torch.load(weights_only=True); the policy spec rides along for exports.
        self.config = PPOConfig(
            env_id=env_id,
            env_kwargs=env_kwargs,
            num_envs=int(num_envs),
            rollout_steps=int(rollout_steps),
            update_epochs=int(update_epochs),
            minibatch_size=int(minibatch_size),
            learning_rate=float(learning_rate),
            gamma=float(gamma),
            gae_lambda=float(gae_lambda),
            clip_coef=float(clip_coef),
            ent_coef=float(ent_coef),
            vf_coef=float(vf_coef),
            max_grad_norm=float(max_grad_norm),
            target_kl=None if target_kl is None else float(target_kl),
            normalize_rewards=bool(normalize_rewards),
            normalize_advantages=bool(normalize_advantages),
            updates_per_epoch=int(updates_per_epoch),
            seed=int(seed),
            log_on_epoch=bool(log_on_epoch),
        )
        # Explicit primitive hparams (lists, not tuples or OmegaConf containers) so a checkpoint
        # loads with torch.load(weights_only=True); the policy spec rides along for exports.
        self.save_hyperparameters({**asdict(self.config), **spec.to_dict()})
        self.automatic_optimization = False
        self.spec = spec
        self.policy_net = PolicyNetwork(spec)
        self.value_net = ValueNetwork(spec)
        self.return_normalizer = RunningMeanStd(())
        # Fault injection and experiments scale the reward the learner sees (-1 = a broken
        # reward model); 1.0 in every real run. Not a buffer: a rollback must not undo a fault.
        self.reward_scale = 1.0
        self.last_rollout: Rollout | None = None
        self._envs: gym.vector.VectorEnv | None = None
        self._next_obs: Tensor | None = None
        self._running_returns = np.zeros(num_envs)
        self._discounted_returns = np.zeros(num_envs)
        self._recent_returns: deque[float] = deque(maxlen=100)

    # ----------------------------------------------------------------------------------------
    # Lightning plumbing
    # ----------------------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam over both networks (eps 1e-5 as in the PPO reference implementations)."""
        return torch.optim.Adam(self.parameters(), lr=self.config.learning_rate, eps=1e-5)

    def train_dataloader(self) -> torch.utils.data.DataLoader[int]:
        """Dummy items, one per update (PPO collects its own data)."""
        return torch.utils.data.DataLoader(
            _UpdateIndex(self.config.updates_per_epoch), batch_size=None
        )

    def on_fit_end(self) -> None:
        """Close the environments."""
        if self._envs is not None:
            self._envs.close()
            self._envs = None

    def _ensure_envs(self) -> gym.vector.VectorEnv:
        if self._envs is None:
            self._envs = make_vector_env(
                self.config.env_id, self.config.num_envs, self.config.env_kwargs
            )
            # Different ranks explore different episodes.
            seed = self.config.seed + self.global_rank * self.config.num_envs
            obs, _ = self._envs.reset(seed=seed)
            self._envs.action_space.seed(seed)
            self._next_obs = torch.as_tensor(obs, dtype=torch.float32)
        return self._envs

    # ----------------------------------------------------------------------------------------
    # Rollout
    # ----------------------------------------------------------------------------------------

    def _update_obs_statistics(self, observations: Tensor) -> None:
        """Merge the rollout's observation moments into both networks' normalisers.

        Under DDP the moments are averaged over ranks first, so every rank keeps identical
        statistics (and identical checkpoints).
        """
        flat = observations.reshape(-1, self.spec.observation_dim)
        mean, var, count = flat.mean(0), flat.var(0, unbiased=False), flat.shape[0]
        trainer = self._trainer  # None when rolling out outside a fit (tests, evaluation)
        if trainer is not None and trainer.world_size > 1:
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
            var = trainer.strategy.reduce(var, reduce_op="mean")
            count *= trainer.world_size
        for net in (self.policy_net, self.value_net):
            net.obs_normalizer.update_from_moments(mean, var, count)

    @torch.no_grad()
    def collect_rollout(self) -> tuple[Rollout, list[float]]:
        """Step the vector env `rollout_steps` times with the current policy.

        Returns:
            The rollout (with advantages) and the returns of the episodes that finished.

        Raises:
            NonFiniteActionError: When the policy's actions are NaN (diverged parameters).
        """
        envs = self._ensure_envs()
        assert self._next_obs is not None
        steps, n = self.config.rollout_steps, self.config.num_envs
        device = self.device
        obs_buf = torch.zeros((steps, n, self.spec.observation_dim), device=device)
        act_shape = (self.spec.action_dim,) if self.spec.action_kind == "box" else ()
        act_buf = torch.zeros((steps, n, *act_shape), device=device)
        logp_buf = torch.zeros((steps, n), device=device)
        val_buf = torch.zeros((steps, n), device=device)
        rew_buf = torch.zeros((steps, n), device=device)
        done_buf = torch.zeros((steps, n), device=device)
        finished: list[float] = []
        for t in range(steps):
            obs = self._next_obs.to(device)
            obs_buf[t] = obs
            dist = self.policy_net.distribution(obs)
            if not _is_finite(dist):
                raise NonFiniteActionError(
                    f"the policy has non-finite outputs at step {self.global_step}: its "
                    "parameters diverged. Add the rollback guard (RollbackCheckpoint) to recover "
                    "automatically, or resume from the last good checkpoint."
                )
            action = dist.sample()
            act_buf[t] = action
            logp_buf[t] = dist.log_prob(action)
            val_buf[t] = self.value_net(obs)
            env_action = self.policy_net.clip_action(action).cpu().numpy()
            if self.spec.action_kind == "discrete":
                env_action = env_action.astype(np.int64)
            next_obs, reward, terminated, truncated, info = envs.step(env_action)
            reward = np.asarray(reward, dtype=np.float64) * self.reward_scale
            done = np.logical_or(terminated, truncated)
            self._running_returns += reward
            finished.extend(float(r) for r in self._running_returns[done])
            self._running_returns[done] = 0.0
            learner_reward = torch.as_tensor(self._scale_rewards(reward, done), device=device)
            if np.any(truncated & ~terminated):
                # Time-limit ends are not real ends: bootstrap from the final observation.
                cut = np.flatnonzero(truncated & ~terminated)
                final = torch.as_tensor(np.stack(info["final_obs"][cut]), dtype=torch.float32)
                bootstrap = self.value_net(final.to(device))
                learner_reward[cut] += self.config.gamma * bootstrap
            rew_buf[t] = learner_reward
            done_buf[t] = torch.as_tensor(done, dtype=torch.float32, device=device)
            self._next_obs = torch.as_tensor(next_obs, dtype=torch.float32)
        next_value = self.value_net(self._next_obs.to(device))
        advantages, returns = compute_gae(
            rew_buf, val_buf, done_buf, next_value, self.config.gamma, self.config.gae_lambda
        )
        if self.spec.normalize_observations:
            self._update_obs_statistics(obs_buf)
        rollout = Rollout(
            obs_buf, act_buf, logp_buf, val_buf, rew_buf, done_buf, advantages, returns
        )
        return rollout, finished

    def _scale_rewards(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Rewards for the learner: divided by the running std of the discounted return."""
        if not self.config.normalize_rewards:
            return reward.astype(np.float32)
        self._discounted_returns = self._discounted_returns * self.config.gamma + reward
        self.return_normalizer.update(torch.as_tensor(self._discounted_returns))
        self._discounted_returns[done] = 0.0
        device = self.return_normalizer.mean.device
        scaled = self.return_normalizer.scale(torch.as_tensor(reward, device=device))
        return scaled.cpu().numpy().astype(np.float32)

    # ----------------------------------------------------------------------------------------
    # Update
    # ----------------------------------------------------------------------------------------

    def minibatch_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Losses and statistics of one minibatch under the current networks.

        `batch` holds flat `observations`, `actions`, `log_probs` (rollout policy),
        `advantages` and `returns`.
        """
        new_logp, entropy = self.policy_net.evaluate(batch["observations"], batch["actions"])
        advantages = batch["advantages"]
        if self.config.normalize_advantages and advantages.numel() > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        clip = self.config.clip_coef
        policy_loss = clipped_surrogate(new_logp, batch["log_probs"], advantages, clip)
        value_loss = 0.5 * (self.value_net(batch["observations"]) - batch["returns"]).pow(2).mean()
        entropy_mean = entropy.mean()
        loss = policy_loss - self.config.ent_coef * entropy_mean + self.config.vf_coef * value_loss
        with torch.no_grad():
            kl = k3_kl(new_logp, batch["log_probs"])
            clipped = clip_fraction(new_logp, batch["log_probs"], clip)
        return {
            "loss": loss,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy_mean,
            "kl": kl,
            "clip_fraction": clipped,
        }

    def _clip_and_measure(self) -> Tensor:
        """Clip each network's gradient to `max_grad_norm`; return the joint pre-clip norm.

        Separate clipping: the critic's gradient is on the scale of the returns and would
        otherwise shrink the actor's step through a joint norm.
        """
        limit = self.config.max_grad_norm
        norms = [
            torch.nn.utils.clip_grad_norm_(net.parameters(), limit)
            for net in (self.policy_net, self.value_net)
        ]
        return torch.stack(norms).pow(2).sum().sqrt()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One PPO update: rollout, then `update_epochs` passes of minibatch steps."""
        rollout, finished = self.collect_rollout()
        self.last_rollout = rollout
        flat = rollout.flat()
        size = flat["log_probs"].shape[0]
        optimizer = self.optimizers()
        assert isinstance(optimizer, pl.core.optimizer.LightningOptimizer)
        mb = self.config.minibatch_size
        starts = list(range(0, size - mb + 1, mb))
        totals: dict[str, list[Tensor]] = {}
        grad_norms: list[Tensor] = []
        stop = False
        steps_done = 0
        planned = self.config.update_epochs * len(starts)
        for _ in range(self.config.update_epochs):
            order = torch.randperm(size, device=self.device)
            for start in starts:
                index = order[start : start + mb]
                stats = self.minibatch_losses({k: v[index] for k, v in flat.items()})
                if self._kl_too_far(stats["kl"]) and steps_done > 0:
                    stop = True  # SB3: stop before stepping on a minibatch that went too far
                    break
                optimizer.zero_grad()
                self.manual_backward(stats["loss"])
                grad_norms.append(self._clip_and_measure())
                steps_done += 1
                last = steps_done == planned
                self._optimizer_step(optimizer, count_as_update=last)
                for key, value in stats.items():
                    totals.setdefault(key, []).append(value.detach())
            if stop:
                break
        if stop:
            # The update ended early; count it as one update all the same.
            self._optimizer_step(optimizer, count_as_update=True, zero_step=True)
        self._log_update(rollout, finished, totals, grad_norms)

    def _kl_too_far(self, kl: Tensor) -> bool:
        """SB3's early stop: KL above 1.5 x target_kl. Under DDP any rank stopping stops all
        (every rank must make the same number of backward passes)."""
        target_kl = self.config.target_kl
        if target_kl is None:
            return False
        too_far = bool(kl > 1.5 * target_kl)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            too_far = trainer.strategy.reduce_boolean_decision(too_far, all=False)
        return too_far

    def _optimizer_step(
        self,
        optimizer: pl.core.optimizer.LightningOptimizer,
        count_as_update: bool,
        zero_step: bool = False,
    ) -> None:
        """Step the optimiser; only the last minibatch step of an update advances global_step.

        All steps go through the strategy (so precision plugins and hooks apply); the
        LightningOptimizer's `step`, which Lightning counts in `global_step`, is used once per
        update so that one training step is one PPO update.
        """
        if zero_step:
            optimizer.zero_grad()  # an empty step: Adam skips parameters without gradients
        if count_as_update:
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)

    def _log_update(
        self,
        rollout: Rollout,
        finished: list[float],
        totals: dict[str, list[Tensor]],
        grad_norms: list[Tensor],
    ) -> None:
        self._recent_returns.extend(finished)
        # The update's KL: the rollout policy against the updated one, over the whole batch.
        with torch.no_grad():
            flat = rollout.flat()
            new_logp, _ = self.policy_net.evaluate(flat["observations"], flat["actions"])
            kl = k3_kl(new_logp, flat["log_probs"])
        metrics = {f"train/{k}": torch.stack(v).mean() for k, v in totals.items() if k != "kl"}
        metrics["train/grad_norm"] = torch.stack(grad_norms).mean()
        metrics["train/episodes"] = torch.tensor(float(len(finished)))
        # sync_dist: under DDP every rank logs the mean over ranks (a no-op on one device).
        on_epoch = self.config.log_on_epoch
        # One update per batch: batch_size=1 makes an epoch value the mean over its updates.
        self.log_dict(
            metrics, on_step=not on_epoch, on_epoch=on_epoch, sync_dist=True, batch_size=1
        )
        progress = {"train/kl": kl}
        # Mean return of the episodes that ended in this rollout, or of the last 100 when none
        # did (long episodes). Before the first episode ends there is no reward to report, and
        # logging NaN would read as a divergence to the guard.
        if self._recent_returns:
            reward = float(np.mean(finished)) if finished else float(np.mean(self._recent_returns))
            progress["train/reward"] = torch.tensor(reward)
        self.log_dict(
            progress,
            on_step=not on_epoch,
            on_epoch=on_epoch,
            prog_bar=True,
            sync_dist=True,
            batch_size=1,
        )

    # ----------------------------------------------------------------------------------------
    # Inference helpers
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def policy_from_checkpoint(path: str, map_location: str = "cpu") -> PolicyNetwork:
        """Rebuild the trained `policy_net` from a Lightning checkpoint, without the env.

        Loads with `weights_only=True`, so only tensors and primitives are read.
        """
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        return policy_from_state(checkpoint["hyper_parameters"], checkpoint["state_dict"])


def policy_from_state(hparams: dict[str, Any], state_dict: dict[str, Tensor]) -> PolicyNetwork:
    """A `PolicyNetwork` from PPO hyperparameters and a PPO (or policy-only) state dict.

    Accepts a full `PPO.state_dict()` (keys `policy_net.*`) or the policy's own state dict.

    Raises:
        KeyError: When the state dict holds no policy weights.
    """
    policy = PolicyNetwork(PolicySpec.from_dict(hparams))
    prefix = "policy_net."
    own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not own:
        own = {k: v for k, v in state_dict.items() if not k.startswith("value_net.")}
    if not own:
        raise KeyError("the state dict holds no policy_net weights")
    policy.load_state_dict(own)
    policy.eval()
    return policy


def _is_finite(dist: Distribution) -> bool:
    """Whether a policy distribution has finite parameters (sampling NaN ones crashes torch)."""
    if isinstance(dist, Categorical):
        return bool(torch.isfinite(dist.logits).all())
    assert isinstance(dist, Independent)
    base = dist.base_dist
    return bool(torch.isfinite(base.loc).all() and torch.isfinite(base.scale).all())


def _plain(value: Any) -> Any:
    """Convert OmegaConf containers, tuples and numpy scalars to plain Python values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        pass
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
