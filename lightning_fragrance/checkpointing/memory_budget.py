"""How much host memory the guard may hold, and what gives way when the state does not fit.

The guard's host memory is a budget (DESIGN.md §10), by default one extra copy of the training
state: the guide's 7B model has ~84 GB of training state with Adam, and the staging pool used
to keep up to three copies (the snapshot, one being written, one queued). Pure functions: the
orchestrator asks for a plan at each save and applies it.

Copies the budget allows (``budget / state size``) and what each buys:

* >= 3: the unconstrained pipeline: the snapshot, one staged set being written, one queued.
* >= 2: the snapshot kept while the next save is staged into a second set; a save first waits
  for the previous write to finish (no queued set).
* >= 1: one staged set that is at once the snapshot and what the writer reads; a save waits for
  the previous write, drops the snapshot and stages into the same buffers.
* < 1: no copy at all: the save is written synchronously from the live state (the step blocks
  for the whole write) and there is no snapshot (rollbacks read the file).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

DEFAULT_HOST_COPIES = 1.0
"""Default budget, in copies of the training state (issue 12 item 4)."""


@dataclasses.dataclass(frozen=True)
class HostMemoryPlan:
    """What a save may do within the budget.

    Attributes:
        staged_sets: Staged CPU copies that may exist at once (0: write from the live state).
        snapshot: Whether the newest save stays in memory for rollbacks.
        fallback: Why the budget forced a fallback from what was asked ("" when none), with the
            numbers; logged once as a warning.
    """

    staged_sets: int
    snapshot: bool
    fallback: str = ""


def state_nbytes(state: Any) -> int:
    """Bytes of every tensor in a nested dict/list/tuple (a staged copy's size)."""
    if isinstance(state, torch.Tensor):
        return state.nelement() * state.element_size()
    if isinstance(state, Mapping):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def budget_bytes(budget: float | None, state_bytes: int) -> float:
    """The budget in bytes: ``budget`` itself, or `DEFAULT_HOST_COPIES` copies when None."""
    return DEFAULT_HOST_COPIES * state_bytes if budget is None else float(budget)


def plan_host_memory(
    state_bytes: int, budget: float | None, *, async_save: bool, keep_in_memory: bool
) -> HostMemoryPlan:
    """The plan for a training state of ``state_bytes`` under ``budget`` bytes (None: one copy).

    Args:
        state_bytes: Size of the state a save copies (`state_nbytes`).
        budget: Host bytes the guard may hold for copies of the state; None = one copy.
        async_save: Whether background writes were asked for (they need a staged copy).
        keep_in_memory: Whether the in-memory snapshot was asked for.
    """
    allowed = budget_bytes(budget, state_bytes)
    copies = allowed / state_bytes if state_bytes > 0 else float("inf")
    wanted = 3 if (async_save and keep_in_memory) else 2 if (async_save or keep_in_memory) else 1
    if copies >= 1:
        return HostMemoryPlan(int(min(wanted, copies)), keep_in_memory)
    lost = [
        what
        for what, asked in (
            (
                "saves are written synchronously from the live state (the step blocks for the "
                "whole write)",
                async_save,
            ),
            ("there is no in-memory snapshot (rollbacks read the file)", keep_in_memory),
        )
        if asked
    ]
    fallback = (
        f"Host memory budget {allowed / 1e9:.2f} GB is below one copy of the training state "
        f"({state_bytes / 1e9:.2f} GB): {'; '.join(lost) or 'saves stage no copy'}. Raise "
        f"host_memory_budget to at least {state_bytes / 1e9:.2f} GB to stage a copy."
    )
    return HostMemoryPlan(0, False, fallback)
