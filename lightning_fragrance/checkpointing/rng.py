"""Capture and restore the random number generators in a weights_only-safe form.

Lightning checkpoints do not carry RNG state (research note §1.2), and raw
``np.random.get_state()`` (an ndarray) fails ``torch.load(weights_only=True)`` (§6.2), so the
states are stored as tensors and plain lists.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def collect_rng_state() -> dict[str, Any]:
    """The current python, numpy, torch and CUDA generator states of this process."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [int(version), [int(x) for x in internal], gauss],
        "numpy": [
            str(np_kind),
            np.asarray(np_keys).tolist(),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `collect_rng_state` captured; absent parts are left as they are."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(
            (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        )
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).clone())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.clone() for t in state["cuda"]])


def reseed(seed: int) -> None:
    """Seed every generator, e.g. so a rollback does not replay the same random draws."""
    seed = seed % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
