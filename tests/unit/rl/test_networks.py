"""Policy / value networks, the running normaliser and the rebuildable policy spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_fragrance.rl import PolicySpec, RunningMeanStd, build_policy_net
from lightning_fragrance.rl.networks import ValueNetwork


def _box_spec(**overrides: object) -> PolicySpec:
    values: dict[str, object] = {
        "observation_dim": 3,
        "action_kind": "box",
        "action_dim": 2,
        "action_low": [-1.0, 0.0],
        "action_high": [1.0, 0.5],
        "hidden_sizes": [8],
    }
    values.update(overrides)
    return PolicySpec(**values)  # type: ignore[arg-type]


def test_running_mean_std_matches_numpy_over_several_batches() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(500, 4))
    stats = RunningMeanStd((4,), epsilon=0.0)
    for chunk in np.array_split(data, 7):
        stats.update(torch.as_tensor(chunk, dtype=torch.float32))
    np.testing.assert_allclose(stats.mean.numpy(), data.mean(0), rtol=1e-4)
    np.testing.assert_allclose(stats.var.numpy(), data.var(0), rtol=1e-3)
    assert stats.count.item() == 500


def test_normaliser_statistics_live_in_the_state_dict() -> None:
    policy = build_policy_net(_box_spec())
    policy.obs_normalizer.update(torch.randn(10, 3) + 5)
    state = policy.state_dict()
    assert {"obs_normalizer.mean", "obs_normalizer.var", "obs_normalizer.count"} <= set(state)
    fresh = build_policy_net(_box_spec())
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.obs_normalizer.mean, policy.obs_normalizer.mean)


def test_policy_spec_round_trips_through_json() -> None:
    spec = _box_spec()
    assert PolicySpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_box_actions_are_clipped_to_the_action_bounds() -> None:
    policy = build_policy_net(_box_spec(init_log_std=2.0))
    actions = policy.act(torch.randn(256, 3), deterministic=False)
    assert torch.all(actions >= torch.tensor([-1.0, 0.0]))
    assert torch.all(actions <= torch.tensor([1.0, 0.5]))


def test_discrete_policy_acts_greedily_with_argmax() -> None:
    spec = PolicySpec(4, "discrete", 3, hidden_sizes=[8])
    policy = build_policy_net(spec)
    obs = torch.randn(5, 4)
    expected = policy.distribution(obs).probs.argmax(-1)  # type: ignore[attr-defined]
    torch.testing.assert_close(policy(obs), expected)


def test_value_network_returns_one_value_per_observation() -> None:
    assert ValueNetwork(_box_spec()).forward(torch.randn(6, 3)).shape == (6,)


def test_invalid_specs_are_rejected_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="activation='swish'"):
        _box_spec(activation="swish")
    with pytest.raises(ValueError, match="needs 2 bounds"):
        _box_spec(action_low=[-1.0])
    with pytest.raises(ValueError, match="'discrete' or 'box'"):
        PolicySpec(3, "multi", 2)  # type: ignore[arg-type]
