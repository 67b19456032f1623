"""GAE and the PPO statistics against direct computations on fixed batches."""

from __future__ import annotations

import torch

from lightning_fragrance.rl.rollout import clip_fraction, clipped_surrogate, compute_gae, k3_kl


def test_gae_equals_the_textbook_recursion_on_a_fixed_batch() -> None:
    rewards = torch.tensor([[1.0], [0.5], [2.0]])
    values = torch.tensor([[0.2], [0.4], [0.1]])
    dones = torch.zeros(3, 1)
    next_value = torch.tensor([0.3])
    gamma, lam = 0.9, 0.8
    d2 = 2.0 + gamma * 0.3 - 0.1
    d1 = 0.5 + gamma * 0.1 - 0.4
    d0 = 1.0 + gamma * 0.4 - 0.2
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = compute_gae(rewards, values, dones, next_value, gamma, lam)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(returns, advantages + values)


def test_gae_does_not_bootstrap_across_an_episode_end() -> None:
    rewards = torch.tensor([[1.0], [1.0]])
    values = torch.tensor([[0.5], [9.0]])
    dones = torch.tensor([[1.0], [0.0]])
    advantages, _ = compute_gae(rewards, values, dones, torch.tensor([0.0]), 0.99, 0.95)
    # Step 0 ended its episode: its advantage is r - V, nothing from step 1 (value 9) leaks in.
    assert advantages[0, 0].item() == 1.0 - 0.5


def test_k3_kl_equals_the_direct_formula_and_is_never_negative() -> None:
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(1000, generator=generator)
    new = old + 0.3 * torch.randn(1000, generator=generator)
    ratio = torch.exp(new - old)
    expected = ((ratio - 1) - torch.log(ratio)).mean()
    torch.testing.assert_close(k3_kl(new, old), expected)
    assert k3_kl(new, old) >= 0
    assert k3_kl(old, old) == 0


def test_clip_fraction_counts_ratios_outside_the_clip_range() -> None:
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.1, 1.3, 0.7]))  # 1.3 and 0.7 leave [0.8, 1.2]
    assert clip_fraction(new, old, 0.2).item() == 0.5


def test_clipped_surrogate_ignores_gains_beyond_the_clip() -> None:
    old = torch.zeros(2)
    new = torch.log(torch.tensor([2.0, 0.5]))
    advantages = torch.tensor([1.0, -1.0])
    # ratio 2 with A>0 is capped at 1.2; ratio 0.5 with A<0 is capped at 0.8.
    expected = torch.tensor([-1.2, 0.8]).mean()
    torch.testing.assert_close(clipped_surrogate(new, old, advantages, 0.2), expected)
