"""Greedy (or sampled) evaluation of a trained policy on fresh environments."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_fragrance.rl.networks import PolicyNetwork
from lightning_fragrance.rl.ppo import make_vector_env


@torch.no_grad()
def evaluate_policy(
    policy_net: PolicyNetwork,
    env_id: str,
    env_kwargs: dict[str, Any] | None = None,
    episodes: int = 20,
    seed: int = 10_000,
    deterministic: bool = True,
    max_steps: int = 100_000,
) -> np.ndarray:
    """Returns of `episodes` episodes, one per environment, run side by side.

    Args:
        policy_net: The policy (its observation normaliser is applied, never updated).
        env_id: Gymnasium id, as given to `PPO`.
        env_kwargs: Keyword arguments for the environment.
        episodes: Number of episodes (= environments).
        seed: Seed of the first environment; the others follow (different from training seeds).
        deterministic: Greedy actions (argmax / Gaussian mean) instead of samples.
        max_steps: Safety bound on vector steps.

    Raises:
        RuntimeError: When some episode did not end within `max_steps`.
    """
    envs = make_vector_env(env_id, episodes, env_kwargs)
    device = policy_net.action_low.device
    try:
        obs, _ = envs.reset(seed=seed)
        returns = np.zeros(episodes)
        done = np.zeros(episodes, dtype=bool)
        for _ in range(max_steps):
            observations = torch.as_tensor(obs, dtype=torch.float32, device=device)
            action = policy_net.act(observations, deterministic)
            env_action = action.cpu().numpy()
            if policy_net.spec.action_kind == "discrete":
                env_action = env_action.astype(np.int64)
            obs, reward, terminated, truncated, _ = envs.step(env_action)
            returns += np.where(done, 0.0, reward)
            done |= np.logical_or(terminated, truncated)
            if done.all():
                return returns
    finally:
        envs.close()
    raise RuntimeError(f"{int((~done).sum())} episodes did not end within {max_steps} steps")
