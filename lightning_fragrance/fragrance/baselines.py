"""Reference policies for the fragrance task, so that "mean reward >= 20" means something.

* `random_action`: uniform over the action box (what an untrained policy roughly does).
* `heuristic_action`: a per-brief rule a junior perfumer might follow: the ten materials whose
  family profile is closest to the brief, equal parts, requested notes in, avoided notes out,
  concentration in the middle of the intensity's range. It ignores the pyramid and IFRA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lightning_fragrance.fragrance.brief import Brief
from lightning_fragrance.fragrance.catalog import Catalog, default_catalog
from lightning_fragrance.fragrance.dna import MAX_CONCENTRATION, MIN_CONCENTRATION
from lightning_fragrance.fragrance.env import FormulationEnv

ActionFn = Callable[[Brief, np.ndarray, np.random.Generator], np.ndarray]

HEURISTIC_MATERIALS = 10


def random_action(brief: Brief, observation: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random action (the brief is ignored)."""
    return rng.uniform(-1.0, 1.0, size=len(default_catalog()) + 1)


def heuristic_action(
    brief: Brief,
    observation: np.ndarray,
    rng: np.random.Generator,
    catalog: Catalog | None = None,
) -> np.ndarray:
    """The closest-profile rule described in the module docstring."""
    catalog = catalog or default_catalog()
    target = np.asarray(brief.profile_vector())
    fit = catalog.unit_profiles @ target
    for name in brief.avoid_notes:
        fit[catalog.index_of(name)] = -np.inf
    for name in brief.include_notes:
        fit[catalog.index_of(name)] = np.inf
    chosen = np.argsort(-fit, kind="stable")[:HEURISTIC_MATERIALS]
    action = -np.ones(len(catalog) + 1)
    action[chosen] = 1.0
    low, high = brief.concentration_range
    middle = (low + high) / 2.0
    action[-1] = 2.0 * (middle - MIN_CONCENTRATION) / (MAX_CONCENTRATION - MIN_CONCENTRATION) - 1.0
    return action


@dataclass(frozen=True)
class BaselineResult:
    """Mean and spread of a policy's reward over random briefs."""

    name: str
    mean_reward: float
    std_reward: float
    episodes: int


def evaluate(name: str, policy: ActionFn, episodes: int = 500, seed: int = 0) -> BaselineResult:
    """Mean reward of `policy` over `episodes` random briefs (seeded, reproducible)."""
    env = FormulationEnv()
    rng = np.random.default_rng(seed)
    rewards = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        assert env.brief is not None
        _, reward, _, _, _ = env.step(policy(env.brief, observation, rng))
        rewards.append(reward)
    return BaselineResult(name, float(np.mean(rewards)), float(np.std(rewards)), episodes)


def baseline_rewards(episodes: int = 500, seed: int = 0) -> dict[str, BaselineResult]:
    """Random and heuristic baselines on the same briefs."""
    return {
        "random": evaluate("random", random_action, episodes, seed),
        "heuristic": evaluate("heuristic", heuristic_action, episodes, seed),
    }
