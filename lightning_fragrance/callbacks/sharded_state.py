"""The Trainer's sharded state (FSDP2) as a `ShardedStateProvider`, and the sharded resume checks.

Under ``ModelParallelStrategy`` (``fully_shard`` in ``configure_model``; it runs on CPU with
gloo) and ``FSDPStrategy(state_dict_type="sharded")`` every rank holds a shard of the weights
and optimizer moments. The guard saves them with ``torch.distributed.checkpoint`` in the layout
those strategies write themselves (``{"state_dict"|"model": ..., "optimizer_0": ...}`` plus
``meta.pt``), so ``trainer.fit(ckpt_path=<checkpoint dir>)`` resumes with Lightning's own loader.
The engine side (collective commit, sha256 before any read) is `checkpointing.sharded`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from lightning_fragrance.callbacks.trainer_state import TrainerState
from lightning_fragrance.checkpointing import CheckpointStore
from lightning_fragrance.checkpointing.errors import CheckpointCorruptError, CheckpointError
from lightning_fragrance.checkpointing.sharded import ShardedState

log = logging.getLogger("lightning_fragrance.callbacks.rollback")


def sharded_model_key(strategy: Strategy, owner: str) -> str | None:
    """Where the weights go in this strategy's sharded checkpoints; None for a strategy whose
    ranks hold the whole model (single device, DDP).

    Raises:
        CheckpointError: A sharded strategy configured to gather the full state on rank 0, or
            DeepSpeed (its checkpoints are its own format; unsupported).
    """
    if isinstance(strategy, ModelParallelStrategy):
        if not strategy._save_distributed_checkpoint:
            raise CheckpointError(
                f"{owner} under ModelParallelStrategy saves every rank's shard with "
                "torch.distributed.checkpoint; save_distributed_checkpoint=False would gather "
                "the full state on rank 0 instead. Keep the default (True)."
            )
        return "state_dict"  # ModelParallelStrategy.save_checkpoint's key
    if isinstance(strategy, FSDPStrategy):
        if strategy._state_dict_type != "sharded":
            raise CheckpointError(
                f"{owner} under FSDPStrategy saves every rank's shard; state_dict_type="
                f"{strategy._state_dict_type!r} would gather the full state on rank 0. Use "
                'FSDPStrategy(state_dict_type="sharded") (the default).'
            )
        return "model"  # FSDPStrategy.save_checkpoint's key
    if type(strategy).__name__.startswith("DeepSpeed"):
        raise CheckpointError(
            f"{owner} does not support DeepSpeed (its checkpoints are its own engine's format); "
            "use ModelParallelStrategy (FSDP2), FSDPStrategy, DDP or a single device."
        )
    return None


class ShardedTrainerState(TrainerState):
    """`ShardedStateProvider` over a Trainer whose strategy shards the model.

    Args:
        trainer: The Trainer.
        pl_module: Its LightningModule.
        model_key: `sharded_model_key` of the strategy.
        restore_scheduler: Restore LR schedulers with the rest.
        restore_precision: Restore the precision plugin (GradScaler scale).
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model_key: str,
        restore_scheduler: bool = True,
        restore_precision: bool = True,
    ) -> None:
        super().__init__(trainer, pl_module, restore_scheduler, restore_precision)
        self.model_key = model_key

    @property
    def _model(self) -> torch.nn.Module:
        model = self.trainer.strategy.model
        assert model is not None
        return model

    def capture_sharded(self) -> ShardedState:
        # The dict Trainer.save_checkpoint builds, split as the strategy's own save_checkpoint
        # splits it: its state dicts are sharded (DTensor chunks of this rank, no gather).
        checkpoint = dict(self.capture())
        sharded: dict[str, Any] = {self.model_key: checkpoint.pop("state_dict")}
        for index, state in enumerate(checkpoint.pop("optimizer_states", [])):
            sharded[f"optimizer_{index}"] = state
        return ShardedState(sharded, checkpoint)

    def parameters(self) -> Iterator[torch.Tensor]:
        for param in self.pl_module.parameters():
            # The local shard: a reduction over a DTensor would be a collective per tensor.
            yield param.to_local() if isinstance(param, DTensor) else param

    def load_targets(self) -> dict[str, Any]:
        model = self._model
        targets: dict[str, Any] = {self.model_key: get_model_state_dict(model)}
        for index, optimizer in enumerate(self.trainer.optimizers):
            targets[f"optimizer_{index}"] = get_optimizer_state_dict(model, optimizer)
        return targets

    def restore_sharded(self, loaded: dict[str, Any], extra: Mapping[str, Any]) -> None:
        model, checkpoint = self._model, dict(extra)
        self.pl_module.on_load_checkpoint(checkpoint)  # the module's RL state, as on resume
        options = StateDictOptions(strict=self.pl_module.strict_loading)
        set_model_state_dict(model, loaded[self.model_key], options=options)
        for index, optimizer in enumerate(self.trainer.optimizers):
            set_optimizer_state_dict(model, optimizer, loaded[f"optimizer_{index}"])
        self.restore_rest(checkpoint, from_memory=False)

    def restore(self, state: Mapping[str, Any], from_memory: bool) -> None:
        raise CheckpointError(
            "A sharded state is restored collectively from its verified shards "
            "(ShardedCheckpointer.load), never from one process's dict."
        )


def verify_before_load(strategy: Strategy, owner: str) -> None:
    """Make ``strategy`` check a sharded checkpoint's files against the history beside it
    before its own loader reads them (``fit(ckpt_path=<dir>)``).

    Lightning has no hook between choosing the path and reading it, and DCP's ``.metadata`` is
    a pickle: the check wraps this strategy instance's ``load_checkpoint`` (idempotent).
    """
    load = strategy.load_checkpoint
    if getattr(load, "verifies_sharded_checkpoints", False):
        return

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        verify_resume_directory(strategy, os.fspath(checkpoint_path), owner)
        return load(checkpoint_path, weights_only=weights_only)

    load_checkpoint.verifies_sharded_checkpoints = True  # type: ignore[attr-defined]
    setattr(strategy, "load_checkpoint", load_checkpoint)  # noqa: B010 (shadows the method)


def verify_resume_directory(strategy: Strategy, path: str, owner: str) -> None:
    """Rank 0 checks every file of a sharded checkpoint directory against its history and
    broadcasts the verdict, so every rank refuses together (nothing read yet).

    A directory no history lists is resumed with a warning (Lightning's own sharded save).

    Raises:
        CheckpointCorruptError: A file is missing or differs from the history.
    """
    path = path.rstrip("/")
    if not os.path.isdir(path):
        return
    problem: str | None = None
    if strategy.is_global_zero:
        parent, name = os.path.split(os.path.abspath(path))
        store = CheckpointStore(parent, read_only=True)
        record = next((r for r in store.records() if r.file == name and r.sharded), None)
        if record is None:
            log.warning(
                "%s: %s is not listed in a checkpoint history beside it; resuming without a "
                "sha256 check of its files.",
                owner,
                path,
            )
        else:
            problem = store.check(record)
    problem = strategy.broadcast(problem, src=0)
    if problem is not None:
        raise CheckpointCorruptError(
            f"{owner}: refusing to resume from {path}: {problem}. Nothing was read; resume from "
            "another checkpoint (`lf-checkpoints verify` lists the intact ones)."
        )
