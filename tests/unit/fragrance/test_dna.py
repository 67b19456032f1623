"""The action decoder (`decode_action`) and `formulate`, shared by training and serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_fragrance.fragrance import (
    DecoderConfig,
    decode_action,
    default_catalog,
    encode_brief,
    formulate,
    parse_brief,
)
from lightning_fragrance.fragrance.dna import MAX_CONCENTRATION, MIN_CONCENTRATION
from lightning_fragrance.rl import PolicySpec, build_policy_net

BRIEF = parse_brief("fresh citrus with bergamot for summer, not too sweet")


@pytest.mark.parametrize("seed", range(25))
def test_decoded_percentages_sum_to_the_concentration(seed: int) -> None:
    rng = np.random.default_rng(seed)
    action = rng.uniform(-1.5, 1.5, len(default_catalog()) + 1)
    dna = decode_action(action, BRIEF)
    total = sum(line.percent for line in dna.ingredients)
    assert total == pytest.approx(dna.concentration_pct, rel=1e-9)
    assert sum(line.share for line in dna.ingredients) == pytest.approx(1.0)
    assert MIN_CONCENTRATION <= dna.concentration_pct <= MAX_CONCENTRATION
    assert 1 <= len(dna.ingredients) <= DecoderConfig().max_ingredients
    shares = [line.share for line in dna.ingredients]
    assert shares == sorted(shares, reverse=True)


def test_decoded_lines_carry_note_cas_and_per_line_ifra_status() -> None:
    catalog = default_catalog()
    action = -np.ones(len(catalog) + 1)
    action[catalog.index_of("Bergamot oil")] = 1.0
    action[catalog.index_of("Cedarwood oil (Virginia)")] = 0.9
    dna = decode_action(action, BRIEF)
    bergamot = next(line for line in dna.ingredients if line.name == "Bergamot oil")
    assert bergamot.cas == "8007-75-8"
    assert bergamot.note.value == "top"
    assert bergamot.within_ifra == (bergamot.percent <= 0.4)
    assert dna.ifra_compliant == all(line.within_ifra for line in dna.ingredients)
    assert max(dna.predicted_profile.values()) == pytest.approx(1.0)
    assert sum(dna.pyramid.values()) == pytest.approx(1.0)


def test_concentration_entry_maps_linearly_onto_the_allowed_range() -> None:
    n = len(default_catalog())
    low = decode_action(np.r_[np.zeros(n), -1.0], BRIEF).concentration_pct
    high = decode_action(np.r_[np.zeros(n), 1.0], BRIEF).concentration_pct
    assert (low, high) == pytest.approx((MIN_CONCENTRATION, MAX_CONCENTRATION))


def test_decoder_rejects_actions_of_the_wrong_length_or_with_nan() -> None:
    n = len(default_catalog())
    with pytest.raises(ValueError, match=f"expected {n + 1}"):
        decode_action(np.zeros(n), BRIEF)
    bad = np.zeros(n + 1)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        decode_action(bad, BRIEF)


def test_decoder_accepts_torch_tensors_and_lists_alike() -> None:
    action = np.linspace(-1, 1, len(default_catalog()) + 1)
    expected = decode_action(action, BRIEF)
    assert decode_action(torch.tensor(action), BRIEF) == expected
    assert decode_action(action.tolist(), BRIEF) == expected


def test_formulate_decodes_the_greedy_action_of_a_policy() -> None:
    catalog = default_catalog()
    obs_dim = encode_brief(BRIEF, catalog).shape[0]
    spec = PolicySpec(
        obs_dim,
        "box",
        len(catalog) + 1,
        [-1.0] * (len(catalog) + 1),
        [1.0] * (len(catalog) + 1),
        [16],
        normalize_observations=False,
    )
    policy = build_policy_net(spec)
    dna = formulate(policy, BRIEF)
    observation = torch.as_tensor(encode_brief(BRIEF, catalog)).unsqueeze(0)
    assert dna == decode_action(policy.act(observation)[0].detach(), BRIEF)
