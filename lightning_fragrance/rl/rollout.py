"""Rollout storage, GAE and the per-update PPO statistics, as plain tensor functions.

Kept apart from the LightningModule so each formula can be checked against a direct computation
on a fixed batch (tests/unit/rl/test_rollout.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One rollout of `steps` vector steps over `envs` environments (time-major tensors).

    Attributes:
        observations: `(steps, envs, *obs_shape)`.
        actions: `(steps, envs, *action_shape)`, the sampled (unclipped) actions.
        log_probs: `(steps, envs)`, log-probability of `actions` under the rollout policy.
        values: `(steps, envs)`, the critic's values of `observations`.
        rewards: `(steps, envs)`, rewards as the learner sees them (after any scaling, with the
            bootstrap of truncated episodes folded in).
        dones: `(steps, envs)`, 1.0 where the episode ended at this step.
        advantages: `(steps, envs)`, filled by `compute_gae`.
        returns: `(steps, envs)`, advantages + values.
    """

    observations: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    rewards: Tensor
    dones: Tensor
    advantages: Tensor
    returns: Tensor

    def flat(self) -> dict[str, Tensor]:
        """Every field with the time and env dimensions merged (for minibatching)."""
        steps, envs = self.log_probs.shape
        return {
            name: value.reshape(steps * envs, *value.shape[2:])
            for name, value in vars(self).items()
        }


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    dones: Tensor,
    next_value: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

    `dones[t]` marks that the episode ended at step t, so step t+1 belongs to a new episode and
    is not bootstrapped (truncated episodes carry their bootstrap in `rewards` already).

    Returns:
        `(advantages, returns)`, each shaped like `rewards`.
    """
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    steps = rewards.shape[0]
    for t in reversed(range(steps)):
        following = next_value if t == steps - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * following * not_done - values[t]
        last = delta + gamma * gae_lambda * not_done * last
        advantages[t] = last
    return advantages, advantages + values


def k3_kl(new_log_probs: Tensor, old_log_probs: Tensor) -> Tensor:
    """Schulman's k3 estimate of KL(old || new): mean of `(r - 1) - log r`, r = new / old.

    Unbiased, low variance and never negative, which makes it the right trigger statistic
    (research note §2.4).
    """
    log_ratio = new_log_probs - old_log_probs
    return ((log_ratio.exp() - 1.0) - log_ratio).mean()


def clip_fraction(new_log_probs: Tensor, old_log_probs: Tensor, clip_coef: float) -> Tensor:
    """Share of samples whose probability ratio left `[1 - clip, 1 + clip]` (SB3, CleanRL)."""
    ratio = (new_log_probs - old_log_probs).exp()
    return ((ratio - 1.0).abs() > clip_coef).float().mean()


def clipped_surrogate(
    new_log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_coef: float
) -> Tensor:
    """PPO's clipped policy loss (to minimise)."""
    ratio = (new_log_probs - old_log_probs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    return torch.maximum(unclipped, clipped).mean()
