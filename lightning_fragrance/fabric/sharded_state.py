"""A Fabric loop's sharded state (FSDP2) as a `ShardedStateProvider`, and which strategies shard.

Under Fabric's ``ModelParallelStrategy`` (``fully_shard`` in ``parallelize_fn``; it runs on CPU
with gloo) every rank holds one slice of each weight and optimizer moment. The guard saves them
as ``fabric.save(dir, state)`` does for that strategy: one torch.distributed.checkpoint (DCP)
save of ``{<module key>: model state dict, <optimizer key>: optimizer state dict}`` (each rank
writes its own ``__<rank>_0.distcp``) and everything else of ``state`` in rank 0's ``meta.pt``,
so ``fabric.load(dir, state)`` reads the directory back. The engine side (collective commit,
sha256 before any read) is `lightning_fragrance.checkpointing.sharded`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.fabric.strategies.strategy import _Sharded
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from lightning_fragrance.checkpointing import CheckpointError, collect_rng_state, restore_rng_state
from lightning_fragrance.checkpointing.sharded import ShardedState
from lightning_fragrance.fabric.state import RNG_KEY, FabricState, stateful


def saves_sharded(strategy: Strategy, owner: str) -> bool:
    """Whether ``strategy`` keeps a shard of the model per rank (the guard then saves with DCP).

    Checked before any collective, so every rank raises the same error instead of hanging.

    Raises:
        ValueError: A sharded strategy configured to gather the full state on rank 0.
        NotImplementedError: DeepSpeed, XLA FSDP or another sharded strategy whose state the
            guard cannot save shard by shard.
    """
    if isinstance(strategy, ModelParallelStrategy):
        if not strategy._save_distributed_checkpoint:
            raise ValueError(
                f"{owner} under ModelParallelStrategy saves every rank's shard with "
                "torch.distributed.checkpoint; save_distributed_checkpoint=False would gather "
                "the full state on rank 0 at every save. Keep the default (True)."
            )
        return True
    if isinstance(strategy, FSDPStrategy):
        # FSDP1 modules go through the same torch.distributed.checkpoint.state_dict calls as
        # FSDP2 ones; this path needs a GPU and is untested here (docs/checkpointing.md).
        if strategy._state_dict_type != "sharded":
            raise ValueError(
                f"{owner} under FSDPStrategy saves every rank's shard; state_dict_type="
                f"{strategy._state_dict_type!r} would gather the full state on rank 0. Use "
                'FSDPStrategy(state_dict_type="sharded") (the default).'
            )
        return True
    if isinstance(strategy, _Sharded) or type(strategy).__name__.startswith("DeepSpeed"):
        raise NotImplementedError(
            f"{owner} does not support {type(strategy).__name__} (its checkpoints are its own "
            "engine's format). Use ModelParallelStrategy (FSDP2 fully_shard), strategy='ddp' or "
            "a single device; checkpoint this run with fabric.save."
        )
    return False


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``tensor`` (the tensor itself when it is not a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedFabricState(FabricState):
    """`ShardedStateProvider` over the state dict of a Fabric loop whose model is sharded.

    Args:
        fabric: The launched Fabric (``ModelParallelStrategy`` or sharded ``FSDPStrategy``).
        state: The dict the loop would give ``fabric.save``, as for `FabricState`; exactly one
            of its modules must be sharded (``fabric.save`` has the same rule).
    """

    def _sharded_module(self, objects: Mapping[str, Any]) -> nn.Module:
        """The one module whose parameters are split across ranks (the optimizers' owner)."""
        sharded = [
            key for key, obj in objects.items() if isinstance(obj, nn.Module) and _is_sharded(obj)
        ]
        if len(sharded) != 1:
            modules = sorted(k for k, o in objects.items() if isinstance(o, nn.Module))
            raise ValueError(
                f"A sharded checkpoint holds exactly one sharded model (as fabric.save requires); "
                f"the state has {len(sharded)} ({sharded}) among its modules {modules}. Pass the "
                "model returned by fabric.setup_module in the state, and only one."
            )
        module = objects[sharded[0]]
        assert isinstance(module, nn.Module)
        return module

    def _state_dicts(self) -> dict[str, Any]:
        """Module and optimizer state dicts as DCP saves and fills them: this rank's shards,
        no gather (``get_optimizer_state_dict`` first creates a fresh optimizer's moments)."""
        objects = self._objects()
        module = self._sharded_module(objects)
        dicts: dict[str, Any] = {}
        for key, obj in objects.items():
            if isinstance(obj, nn.Module):
                dicts[key] = get_model_state_dict(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                dicts[key] = get_optimizer_state_dict(module, obj)
        return dicts

    def capture_sharded(self) -> ShardedState:
        # Split as Fabric's ModelParallelStrategy.save_checkpoint splits the state: modules
        # and optimizers to DCP, the rest (schedulers, plain values) to meta.pt.
        extra: dict[str, Any] = {}
        for key, obj in self._objects().items():
            if isinstance(obj, (nn.Module, torch.optim.Optimizer)):
                continue
            extra[key] = obj.state_dict() if stateful(obj) else obj
        extra[RNG_KEY] = collect_rng_state()
        return ShardedState(self._state_dicts(), extra)

    def load_targets(self) -> dict[str, Any]:
        return self._state_dicts()

    def restore_sharded(self, loaded: dict[str, Any], extra: Mapping[str, Any]) -> None:
        objects = self._objects()
        missing = [key for key in objects if key not in loaded and key not in extra]
        if missing:
            raise KeyError(
                f"the checkpoint lacks {missing} of the loop's state (it holds "
                f"{sorted({*loaded, *extra})}): the state dict given to the guard changed keys "
                "since this checkpoint was saved"
            )
        module = self._sharded_module(objects)
        for key, obj in objects.items():
            if isinstance(obj, nn.Module):
                set_model_state_dict(obj, loaded[key])  # strict: copies into the live shards
            elif isinstance(obj, torch.optim.Optimizer):
                set_optimizer_state_dict(module, obj, loaded[key])
                obj.zero_grad(set_to_none=True)
            elif stateful(obj):
                obj.load_state_dict(copy.deepcopy(extra[key]))
            else:
                self.state[key] = copy.deepcopy(extra[key])
        rng = extra.get(RNG_KEY)
        if rng is not None and self.fabric.is_global_zero:  # meta.pt holds rank 0's RNG
            restore_rng_state(rng)
        for obj in objects.values():
            if isinstance(obj, nn.Module):
                obj.zero_grad(set_to_none=True)

    def restore(self, state: Mapping[str, Any], from_memory: bool) -> None:
        raise CheckpointError(
            "A sharded state is restored collectively from its verified shards "
            "(ShardedCheckpointer.load), never from one process's dict."
        )

    def parameters(self) -> Iterator[torch.Tensor]:
        # The local shard: a reduction over a DTensor would be a collective per tensor.
        for param in super().parameters():
            yield local_tensor(param)


def _is_sharded(module: nn.Module) -> bool:
    """FSDP2/tensor-parallel DTensor parameters, or an FSDP1 wrapper inside."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(p, DTensor) for p in module.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in module.modules()
    )
