"""Restoring an optimizer's state by copying into its existing tensors.

`Optimizer.load_state_dict` keeps same-device tensors by reference (research note §6.1), so
loading an in-memory snapshot needs a deep copy first: a fresh allocation of every moment,
which costs more in page faults than the copy itself. When the live state has the same layout as
the snapshot (the normal case after the first step), copying into the live tensors restores the
same values with no allocation and no aliasing.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

import torch


def copy_optimizer_state_(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> bool:
    """Copy ``saved`` (an ``optimizer.state_dict()``) into ``optimizer`` in place.

    Returns:
        True when done; False, with nothing changed, when the layouts differ (other parameter
        groups, a parameter without state, other shapes or dtypes): then use
        ``optimizer.load_state_dict(copy.deepcopy(saved))``.
    """
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    if len(groups) != len(saved_groups):
        return False
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups, strict=True)):
        return False
    index_to_param = dict(
        zip(
            itertools.chain.from_iterable(s["params"] for s in saved_groups),
            itertools.chain.from_iterable(g["params"] for g in groups),
            strict=True,
        )
    )
    saved_state: Mapping[Any, Mapping[str, Any]] = saved.get("state", {})
    live_state = optimizer.state
    if set(saved_state) != {i for i, p in index_to_param.items() if p in live_state}:
        return False
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index, values in saved_state.items():
        live = live_state[index_to_param[index]]
        if set(live) != set(values):
            return False
        for key, value in values.items():
            current = live[key]
            if isinstance(value, torch.Tensor):
                if not (
                    isinstance(current, torch.Tensor)
                    and current.shape == value.shape
                    and current.dtype == value.dtype
                ):
                    return False
                pairs.append((current, value))
    # Layout checked: now change things.
    for current, value in pairs:
        current.copy_(value)
    for index, values in saved_state.items():
        live = live_state[index_to_param[index]]
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                live[key] = copy.deepcopy(value)
    for group, saved_group in zip(groups, saved_groups, strict=True):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = copy.deepcopy(value)
    return True
