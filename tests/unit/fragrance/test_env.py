"""`FormulationEnv`: Gymnasium conformance, reward bounds, IFRA penalties, baselines."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from lightning_fragrance.fragrance import ENV_ID, Family, FormulationEnv, parse_brief
from lightning_fragrance.fragrance.baselines import baseline_rewards
from lightning_fragrance.fragrance.brief import Brief
from lightning_fragrance.fragrance.catalog import Catalog, default_catalog
from lightning_fragrance.fragrance.dna import (
    MAX_REWARD,
    action_to_composition,
    brief_targets,
    score_composition,
)


def test_env_passes_gymnasium_check_env() -> None:
    check_env(FormulationEnv(render_mode="ansi"), skip_render_check=False)


def test_registered_id_makes_the_env_from_a_fresh_import_path() -> None:
    env = gym.make(f"lightning_fragrance.fragrance:{ENV_ID}")
    obs, _ = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    env.close()


def test_rewards_stay_in_bounds_for_random_and_extreme_actions() -> None:
    env = FormulationEnv()
    rng = np.random.default_rng(0)
    n = env.action_space.shape[0]
    extremes = [np.ones(n), -np.ones(n), np.eye(n)[0] * 2 - 1, np.full(n, 7.0)]
    actions = [rng.uniform(-1, 1, n) for _ in range(300)] + extremes
    for seed, action in enumerate(actions):
        env.reset(seed=seed)
        _, reward, terminated, truncated, info = env.step(action)
        assert 0.0 <= reward <= MAX_REWARD
        assert terminated and not truncated
        assert set(info["reward_terms"]) >= {"profile_match", "ifra_penalty"}


def _action_for(shares_of: dict[str, float], concentration_action: float) -> np.ndarray:
    catalog = default_catalog()
    action = -np.ones(len(catalog) + 1)
    for name, value in shares_of.items():
        action[catalog.index_of(name)] = value
    action[-1] = concentration_action
    return action


def test_ifra_violation_costs_exactly_the_penalty_and_is_reported() -> None:
    catalog = default_catalog()
    brief = Brief(profile={Family.WOODY: 1.0, Family.GREEN: 0.5})
    # Oakmoss dominates at ~18 % of the product: far above its 0.1 % limit.
    action = _action_for({"Oakmoss absolute": 1.0, "Cedarwood oil (Virginia)": 0.8}, 0.0)
    shares, concentration = action_to_composition(action, len(catalog))
    unrestricted = Catalog([dataclasses.replace(i, ifra_max_pct=None) for i in catalog.ingredients])
    with_limits = score_composition(shares, concentration, brief_targets(brief, catalog), catalog)
    without = score_composition(
        shares, concentration, brief_targets(brief, unrestricted), unrestricted
    )
    assert with_limits.ifra_penalty > 0
    assert without.ifra_penalty == 0
    assert with_limits.total == pytest.approx(without.total - with_limits.ifra_penalty)

    env = FormulationEnv(brief=brief)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(action)
    assert info["ifra_violations"] >= 1
    assert reward == pytest.approx(with_limits.total)
    dna = env.decode(action)
    assert not dna.ifra_compliant
    assert any("Oakmoss absolute" in v for v in dna.ifra_violations)


def test_fixed_brief_given_as_text_is_used_in_every_episode() -> None:
    env = FormulationEnv(brief="fresh citrus for summer")
    first, _ = env.reset(seed=1)
    second, _ = env.reset(seed=2)
    np.testing.assert_array_equal(first, second)
    assert env.brief == parse_brief("fresh citrus for summer")


def test_brief_passed_in_reset_options_overrides_the_random_draw() -> None:
    env = FormulationEnv()
    brief = parse_brief("warm amber for winter")
    env.reset(seed=0, options={"brief": brief})
    assert env.brief == brief


def test_same_seed_draws_the_same_brief_and_different_seeds_differ() -> None:
    env = FormulationEnv()
    a, _ = env.reset(seed=11)
    b, _ = env.reset(seed=11)
    c, _ = env.reset(seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_step_before_reset_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="reset"):
        FormulationEnv().step(np.zeros(len(default_catalog()) + 1))


def test_heuristic_baseline_beats_the_random_one() -> None:
    results = baseline_rewards(episodes=200, seed=5)
    assert results["heuristic"].mean_reward > results["random"].mean_reward + 5.0
