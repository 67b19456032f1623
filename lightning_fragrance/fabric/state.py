"""The objects a Fabric loop would pass to ``fabric.save`` as the orchestrator's `StateProvider`.

Capture is what ``fabric.save(path, state)`` writes: each module and optimizer converted through
the strategy's own ``get_module_state_dict`` / ``get_optimizer_state``, every other stateful
object through its ``state_dict()``, plain values as they are. Restore is ``fabric.load(path,
state)`` in place, without the file: modules through ``load_module_state_dict``, optimizers
copied into their live tensors (never aliased to the in-memory snapshot), stateful objects
through ``load_state_dict``, plain values written back into the user's dict. Plus this rank's
RNG, which Fabric checkpoints do not carry.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.wrappers import _unwrap_objects
from torch import nn

from lightning_fragrance.checkpointing import collect_rng_state, restore_rng_state
from lightning_fragrance.checkpointing.optimizer_state import copy_optimizer_state_

RNG_KEY = "lightning_fragrance_rng"
"""Key of the saving rank's RNG state in every file (the Trainer callback uses the same key)."""


def stateful(obj: Any) -> bool:
    """Whether ``obj`` saves and restores itself (a scheduler), as Fabric's ``_Stateful``."""
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


class FabricState:
    """`StateProvider` over the state dict of a Fabric loop.

    Args:
        fabric: The launched Fabric.
        state: The dict the loop would give ``fabric.save``: modules and optimizers returned by
            ``fabric.setup``, schedulers and other objects with ``state_dict``/``load_state_dict``,
            plain values (weights_only-safe: numbers, strings, lists, dicts, tensors). Plain
            values are restored into this dict, as ``fabric.load`` does: keep the loop counter
            out of it, or a rollback rewinds it.
    """

    def __init__(self, fabric: Fabric, state: MutableMapping[str, Any]) -> None:
        if RNG_KEY in state:
            raise ValueError(f"the state dict must not use the key {RNG_KEY!r}: the guard's own")
        self.fabric, self.state = fabric, state

    def _objects(self) -> dict[str, Any]:
        # Fabric's own unwrapping (what fabric.save does): the user's module and optimizer, not
        # the _FabricModule/_FabricOptimizer around them. Private API, pinned by lightning<2.7.
        return dict(_unwrap_objects(dict(self.state)))

    def capture(self) -> Mapping[str, Any]:
        strategy = self.fabric.strategy
        captured: dict[str, Any] = {}
        for key, obj in self._objects().items():
            if isinstance(obj, nn.Module):
                captured[key] = strategy.get_module_state_dict(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                captured[key] = strategy.get_optimizer_state(obj)
            elif stateful(obj):
                captured[key] = obj.state_dict()
            else:
                captured[key] = obj
        captured[RNG_KEY] = collect_rng_state()
        return captured

    def restore(self, state: Mapping[str, Any], from_memory: bool) -> None:
        strategy = self.fabric.strategy
        missing = [key for key in self.state if key not in state]
        if missing:
            raise KeyError(
                f"the checkpoint lacks {missing} of the loop's state (it holds {sorted(state)}): "
                "the state dict given to the guard changed keys since this checkpoint was saved"
            )
        for key, obj in self._objects().items():
            saved = state[key]
            if isinstance(obj, nn.Module):
                strategy.load_module_state_dict(obj, saved, strict=True)  # copies into params
            elif isinstance(obj, torch.optim.Optimizer):
                if not copy_optimizer_state_(obj, saved):  # in place: no second copy
                    # Optimizer.load_state_dict keeps same-device tensors by reference: the next
                    # step would mutate the snapshot (research note §6.1).
                    obj.load_state_dict(copy.deepcopy(saved) if from_memory else saved)
                obj.zero_grad(set_to_none=True)
            elif stateful(obj):
                obj.load_state_dict(copy.deepcopy(saved) if from_memory else saved)
            else:
                self.state[key] = copy.deepcopy(saved)
        rng = state.get(RNG_KEY)
        # A snapshot holds this rank's own RNG; a file holds rank 0's, so only rank 0 takes it.
        if rng is not None and (from_memory or self.fabric.is_global_zero):
            restore_rng_state(rng)
        for module in self._modules():
            module.zero_grad(set_to_none=True)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers in the state (unwrapped)."""
        return [o for o in self._objects().values() if isinstance(o, torch.optim.Optimizer)]

    def schedulers(self) -> list[torch.optim.lr_scheduler.LRScheduler]:
        """The LR schedulers in the state."""
        return [
            o
            for o in self._objects().values()
            if isinstance(o, torch.optim.lr_scheduler.LRScheduler)
        ]

    def _modules(self) -> Iterator[nn.Module]:
        return (obj for obj in self._objects().values() if isinstance(obj, nn.Module))

    def parameters(self) -> Iterator[torch.Tensor]:
        for module in self._modules():
            yield from module.parameters()
