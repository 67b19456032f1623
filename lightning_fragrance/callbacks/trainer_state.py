"""The Trainer's training state as the orchestrator's `StateProvider`, and the Trainer-side
helpers of the guard (where its files go by default, the LR remedy).

Capture is the dict `Trainer.save_checkpoint` writes (a standard Lightning checkpoint); restore
is the sequence Lightning runs on resume, minus the loops, through public `Strategy` methods
(research note §2.2): module hook, weights, optimizers, schedulers, precision plugin, RNG.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import fsspec
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_fragrance.checkpointing import restore_rng_state
from lightning_fragrance.checkpointing.optimizer_state import copy_optimizer_state_
from lightning_fragrance.checkpointing.store import HISTORY_FILE

RNG_KEY = "lightning_fragrance_rng"
"""Key under which every checkpoint written while the guard is active carries the RNG state of
rank 0 (Lightning checkpoints carry none, research note §1.2)."""


class TrainerState:
    """`StateProvider` over a running Trainer and its module.

    Args:
        trainer: The Trainer.
        pl_module: Its LightningModule.
        restore_scheduler: Restore LR schedulers with the rest.
        restore_precision: Restore the precision plugin (GradScaler scale).
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        restore_scheduler: bool = True,
        restore_precision: bool = True,
    ) -> None:
        self.trainer, self.pl_module = trainer, pl_module
        self.restore_scheduler = restore_scheduler
        self.restore_precision = restore_precision

    def capture(self) -> Mapping[str, Any]:
        # `dump_checkpoint` is the dict `trainer.save_checkpoint` writes. Private API (pinned by
        # lightning<2.7 in pyproject), used because the public route serialises synchronously
        # on the training thread; test_rollback_resume guards it.
        return self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)

    def parameters(self) -> Iterator[torch.Tensor]:
        return self.pl_module.parameters()

    def restore(self, state: Mapping[str, Any], from_memory: bool) -> None:
        trainer, pl_module = self.trainer, self.pl_module
        if from_memory:
            # The snapshot must stay intact for later rollbacks: the small parts are deep-copied;
            # weights are copied by Module.load_state_dict, optimizer states copied into the
            # live tensors (or deep-copied below).
            large = ("state_dict", "current_model_state", "optimizer_states")
            checkpoint = {k: v if k in large else copy.deepcopy(v) for k, v in state.items()}
        else:
            checkpoint = dict(state)
        if "current_model_state" in checkpoint:
            # WeightAveraging swaps the averaged weights into "state_dict" (research note §1.2).
            checkpoint["state_dict"] = checkpoint["current_model_state"]
        strategy = trainer.strategy
        pl_module.on_load_checkpoint(checkpoint)  # the module's RL state (KL coef, normalisers)
        strategy.load_model_state_dict(checkpoint, strict=pl_module.strict_loading)
        if strategy.lightning_restore_optimizer and "optimizer_states" in checkpoint:
            self._restore_optimizers(checkpoint, from_memory)
        self.restore_rest(checkpoint, from_memory)

    def restore_rest(self, checkpoint: Mapping[str, Any], from_memory: bool) -> None:
        """Everything after the weights and optimizers: schedulers, precision plugin, RNG, and
        the gradients dropped (shared with the sharded provider, which loads those itself)."""
        trainer, pl_module = self.trainer, self.pl_module
        if self.restore_scheduler:
            states = checkpoint.get("lr_schedulers", [])
            for config, saved in zip(trainer.lr_scheduler_configs, states, strict=False):
                config.scheduler.load_state_dict(saved)
        plugin = trainer.precision_plugin
        plugin_key = type(plugin).__qualname__
        if self.restore_precision and plugin_key in checkpoint:
            plugin.load_state_dict(checkpoint[plugin_key])
        rng = checkpoint.get(RNG_KEY)
        # A snapshot holds this rank's own RNG; a file holds rank 0's, so only rank 0 takes it.
        if rng is not None and (from_memory or trainer.is_global_zero):
            restore_rng_state(rng)
        for optimizer in trainer.optimizers:
            optimizer.zero_grad(set_to_none=True)
        pl_module.zero_grad(set_to_none=True)

    def _restore_optimizers(self, checkpoint: dict[str, Any], from_memory: bool) -> None:
        trainer, strategy = self.trainer, self.trainer.strategy
        states = checkpoint["optimizer_states"]
        # In place from a file too: loading a file's moments would otherwise allocate a second
        # copy of the optimizer state beside the live one (the guard's host budget is one copy).
        in_place = (
            isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))
            and len(states) == len(trainer.optimizers)
            and all(
                copy_optimizer_state_(optimizer, saved)
                for optimizer, saved in zip(trainer.optimizers, states, strict=True)
            )
        )
        if in_place:
            return
        if from_memory:
            # Optimizer.load_state_dict keeps same-device tensors by reference: the next step
            # would mutate the snapshot (research note §6.1).
            checkpoint["optimizer_states"] = copy.deepcopy(states)
        strategy.load_optimizer_state_dict(checkpoint)


def default_dirpath(trainer: pl.Trainer) -> str:
    """One checkpoint directory per run: the directory of the checkpoint a fit resumes from
    (when it holds a history), else ``log_dir/checkpoints`` for the versioned TensorBoard and CSV
    loggers, else the next free ``<log_dir or default_root_dir>/checkpoints/version_N``."""
    resumed = trainer.ckpt_path
    if resumed:
        # rstrip: a sharded checkpoint is a directory, which may be given with a trailing "/"
        parent = os.path.dirname(os.fspath(resumed).rstrip("/"))
        fs, path = fsspec.core.url_to_fs(parent)
        if fs.exists(f"{path}/{HISTORY_FILE}"):
            return parent
    base = trainer.log_dir or trainer.default_root_dir
    root = os.path.join(base, "checkpoints")
    if trainer.loggers and isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)):
        return root  # the logger's log_dir is already one directory per run (version_N)
    fs, path = fsspec.core.url_to_fs(root)
    taken = fs.ls(path, detail=False) if fs.exists(path) else []
    numbers = [
        int(name.rsplit("version_", 1)[1])
        for name in (os.path.basename(str(n).rstrip("/")) for n in taken)
        if name.startswith("version_") and name[8:].isdigit()
    ]
    return os.path.join(root, f"version_{max(numbers, default=-1) + 1}")


def scale_learning_rates(
    optimizers: Sequence[torch.optim.Optimizer], scheduler_configs: Sequence[Any], factor: float
) -> None:
    """Multiply every LR by ``factor``, in the param groups and the schedulers' ``base_lrs``:
    LambdaLR-style schedulers recompute the LR from ``base_lrs`` and would undo a param-group
    write (cosmos-framework's LossSpikeRollback, research note §4)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * factor
    for config in scheduler_configs:
        scheduler = config.scheduler
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
