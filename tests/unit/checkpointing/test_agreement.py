"""Agreeing on readings across micro-batches and ranks: the worst value, the newest production
step, the oldest state reflected (pure functions; the DDP test runs the real collective)."""

from __future__ import annotations

import math

import torch

from lightning_fragrance.checkpointing import Reading
from lightning_fragrance.checkpointing.agreement import merge_worst, pack, unpack

NAMES = ["loss", "reward", "kl_divergence"]


def test_the_worst_value_wins_dated_to_the_newest_step_and_the_oldest_state() -> None:
    a = {"loss": Reading(1.0, 4), "reward": Reading(10.0, 4, since=2)}
    b = {"loss": Reading(3.0, 5), "reward": Reading(12.0, 5)}
    merged = merge_worst(a, b)
    assert merged["loss"] == Reading(3.0, 5, 3)
    assert merged["reward"] == Reading(10.0, 5, 2)  # lower reward is worse


def test_a_non_finite_value_wins_over_any_number() -> None:
    merged = merge_worst({"loss": Reading(math.nan, 3)}, {"loss": Reading(1e9, 4)})
    assert math.isnan(merged["loss"].value)


def test_packed_readings_reduced_with_max_give_every_rank_the_same_worst_readings() -> None:
    rank0 = {"loss": Reading(1.0, 7), "reward": Reading(10.0, 7)}
    rank1 = {"loss": Reading(0.5, 7), "reward": Reading(4.0, 7), "kl_divergence": Reading(9.0, 7)}
    stacked = torch.tensor([pack(NAMES, rank0), pack(NAMES, rank1)], dtype=torch.float64)
    agreed = unpack(NAMES, stacked.max(dim=0).values.tolist())
    assert agreed == {
        "loss": Reading(1.0, 7, 6),
        "reward": Reading(4.0, 7, 6),
        "kl_divergence": Reading(9.0, 7, 6),
    }


def test_a_signal_no_rank_produced_stays_absent_and_a_nan_on_one_rank_is_nan_for_all() -> None:
    rank0 = {"loss": Reading(math.inf, 3)}
    rank1: dict[str, Reading] = {}
    stacked = torch.tensor([pack(NAMES, rank0), pack(NAMES, rank1)], dtype=torch.float64)
    agreed = unpack(NAMES, stacked.max(dim=0).values.tolist())
    assert set(agreed) == {"loss"} and math.isnan(agreed["loss"].value)
