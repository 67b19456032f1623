"""`CheckpointManager`: the operations guide's API for a plain PyTorch training loop.

Usage (the guide's loop)::

    manager = CheckpointManager("checkpoints", save_interval=500, max_checkpoints=5)
    for step in range(1, n_steps + 1):
        loss, reward, kl = train_step()
        should_rollback, checkpoint, reason = manager.check_rollback(step, loss, reward, kl)
        if should_rollback:
            manager.rollback(policy_net, value_net, optimizer)
        elif manager.should_save(step):
            manager.save_checkpoint(step, policy_net, value_net, optimizer, loss, reward, kl)

The Lightning callback `lightning_fragrance.callbacks.RollbackCheckpoint` drives the same
engine from the Trainer's hooks.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import torch
from torch import nn

from lightning_fragrance.checkpointing.conditions import RollbackConditions
from lightning_fragrance.checkpointing.errors import CheckpointCorruptError
from lightning_fragrance.checkpointing.guard import RollbackGuard
from lightning_fragrance.checkpointing.observers import (
    CheckpointObserver,
    LoggingObserver,
    ObserverGroup,
)
from lightning_fragrance.checkpointing.optimizer_state import copy_optimizer_state_
from lightning_fragrance.checkpointing.records import (
    CheckpointRecord,
    CheckpointStatus,
    RollbackDecision,
)
from lightning_fragrance.checkpointing.recovery import Snapshot, find_restore_source
from lightning_fragrance.checkpointing.rng import collect_rng_state, restore_rng_state
from lightning_fragrance.checkpointing.snapshot import AsyncCheckpointWriter, StagingPool
from lightning_fragrance.checkpointing.store import CheckpointStore
from lightning_fragrance.checkpointing.triggers import KL, LOSS, REWARD, Trigger

log = logging.getLogger("lightning_fragrance.checkpointing")


def next_save_step(step: int, interval: int) -> int:
    """The first step at which to save after saving at ``step``: the next multiple of
    ``interval``. Saving uses ``step >= next_save`` so manual optimization, which can move
    ``global_step`` by several per batch, never jumps over a save (research note §6.4)."""
    return (step // interval + 1) * interval


def format_rolled_back(record: CheckpointRecord) -> str:
    """The guide's line: ``Rolled back to step=1000, loss=0.5000, reward=20.0000``."""
    parts = [f"step={record.step}"]
    for name in (LOSS, REWARD):
        if name in record.metrics:
            parts.append(f"{name}={record.metrics[name]:.4f}")
    return "Rolled back to " + ", ".join(parts)


class CheckpointManager:
    """Periodic checkpoints and automatic rollback for a plain PyTorch loop.

    Args:
        checkpoint_dir: Local directory or fsspec URL.
        save_interval: Save at the first step at or past each multiple of this.
        max_checkpoints: Unpinned checkpoints kept on disk.
        rollback_conditions: Triggers and policies (defaults: the guide).
        observers: Told about saves, rollbacks and errors, besides the `LoggingObserver` that is
            always attached (errors are never silent).
        fs: Optional fsspec filesystem (``checkpoint_dir`` is then a path on it).
        async_save: Write in a background thread (the loop only pays for a CPU copy).
        keep_in_memory: Keep the last saved state in memory for instant rollbacks.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        save_interval: int = 500,
        max_checkpoints: int = 5,
        rollback_conditions: RollbackConditions | None = None,
        observers: Iterable[CheckpointObserver] | None = None,
        *,
        fs: fsspec.AbstractFileSystem | None = None,
        async_save: bool = True,
        keep_in_memory: bool = True,
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval={save_interval} must be >= 1")
        self.save_interval = save_interval
        self.conditions = rollback_conditions or RollbackConditions()
        self.observers = ObserverGroup([LoggingObserver(), *(observers or ())])
        self.store = CheckpointStore(str(checkpoint_dir), max_checkpoints, fs=fs)
        self.guard = RollbackGuard(self.conditions, max_checkpoints)
        self.guard.ledger = self.store.records()  # a re-opened directory keeps its targets
        self.writer = AsyncCheckpointWriter(self.store, [self.observers]) if async_save else None
        self.keep_in_memory = keep_in_memory
        self._snapshot: Snapshot | None = None
        self._staging = StagingPool()
        self._pending: tuple[int, Trigger] | None = None
        newest = self.guard.ledger[-1].step if self.guard.ledger else 0
        self._next_save = next_save_step(newest, save_interval) if newest else save_interval

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        """Whether ``step`` reached the next save point (``step >= next save``)."""
        return step >= self._next_save

    def save_checkpoint(
        self,
        step: int,
        policy_net: nn.Module,
        value_net: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        loss: float,
        reward: float,
        kl_divergence: float | None = None,
        entropy: float | None = None,
        clip_fraction: float | None = None,
        **extra: Any,
    ) -> str:
        """Save the training state of ``step`` with its metrics; returns the file's path/URL.

        Numeric ``extra`` values join the metrics; others are stored as they are (they must be
        weights_only-safe: numbers, strings, lists, dicts, tensors).
        """
        self._surface_errors(step)
        metrics = _metrics_dict(loss, reward, kl_divergence, entropy, clip_fraction)
        other: dict[str, Any] = {}
        for key, value in extra.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = float(value)
            else:
                other[key] = value
        started = time.perf_counter()
        keep = self._snapshot.payload if self._snapshot is not None else None
        payload, release = self._staging.stage(
            {
                "step": step,
                "policy_state_dict": policy_net.state_dict(),
                "value_state_dict": value_net.state_dict() if value_net is not None else None,
                "optimizer_state_dict": optimizer.state_dict(),
                "metrics": dict(metrics),
                "rng": collect_rng_state(),
                "extra": other,
            },
            keep=keep,
        )
        blocking = time.perf_counter() - started
        record = self.guard.record_save(step, metrics)
        if self.keep_in_memory:
            self._snapshot = Snapshot(step, payload)
        if self.writer is not None:
            self.writer.submit(step, payload, metrics, record.status, blocking, on_done=release)
        else:
            written_at = time.perf_counter()
            try:
                committed = self.store.commit(step, payload, metrics, record.status)
            except Exception as err:
                self.guard.forget({step})
                self.observers.on_checkpoint_error(step, err)
            else:
                self.observers.on_checkpoint_saved(
                    step, committed.bytes, blocking, time.perf_counter() - written_at
                )
            finally:
                release()
        self._next_save = next_save_step(step, self.save_interval)
        return self.store.url(record.file)

    def _surface_errors(self, step: int) -> None:
        """Write errors of earlier background jobs: logged and reported, never silent."""
        if self.writer is None:
            return
        for error in self.writer.take_errors():
            self.guard.forget({error.step})
            if self._snapshot is not None and self._snapshot.step == error.step:
                # The state itself is fine; only its file is missing. Keep it as a target.
                self.guard.record_save(error.step, self._snapshot.payload["metrics"])
            self.observers.on_checkpoint_error(error.step, error)

    # ------------------------------------------------------------------ judging
    def check_rollback(
        self,
        current_step: int,
        current_loss: float,
        current_reward: float,
        current_kl_divergence: float | None = None,
        **metrics: float,
    ) -> RollbackDecision:
        """Judge the current step against the checkpoint it would roll back to.

        Extra keyword metrics (e.g. ``grad_norm=``) feed the optional triggers.

        Returns:
            ``(should_rollback, checkpoint, reason)``.

        Raises:
            RollbackBudgetExceeded: The trigger fired but the rollback budget is spent.
        """
        self._surface_errors(current_step)
        values = _metrics_dict(current_loss, current_reward, current_kl_divergence, None, None)
        values.update({k: float(v) for k, v in metrics.items()})
        observation = self.guard.observe(current_step, values)
        self._apply_certified(observation.certified)
        trigger = observation.trigger
        if not observation.fire or trigger is None:
            return RollbackDecision(False, None, None)
        log.warning("Rollback triggered: %s", trigger.message)
        if observation.target is None:
            log.warning(
                "No checkpoint to roll back to yet (first save at step %d); training continues "
                "from the current state.",
                self._next_save,
            )
            self._pending = None
            return RollbackDecision(True, None, trigger.reason.value)
        self.guard.check_budget(current_step, trigger)
        self._pending = (current_step, trigger)
        target = self.store.record(observation.target.step) or observation.target
        return RollbackDecision(True, target, trigger.reason.value)

    def _apply_certified(self, steps: Iterable[int]) -> None:
        for step in steps:
            self._store_update(step, CheckpointStatus.CERTIFIED)

    def _store_update(self, step: int, status: CheckpointStatus) -> None:
        def update() -> None:
            self.store.set_status(step, status)

        if self.writer is not None:
            self.writer.run_later(step, update)
        else:
            update()

    # ------------------------------------------------------------------ rollback
    def rollback(
        self,
        policy_net: nn.Module,
        value_net: nn.Module | None,
        optimizer: torch.optim.Optimizer,
    ) -> CheckpointRecord | None:
        """Restore the target chosen by the last `check_rollback` (or the newest good one).

        Restores weights, optimizer state (moments and step) and RNG, and clears gradients.
        A file that fails its sha256 is marked corrupt and the next older checkpoint is used.

        Returns:
            The restored checkpoint, or None when nothing has been saved yet.

        Raises:
            NoGoodCheckpointError: Checkpoints exist but none is intact.
        """
        if self.writer is not None:
            self.writer.flush()  # loading waits for pending writes
            self._surface_errors(-1)
        at_step, trigger = self._pending or (self._latest_step(), None)
        self._pending = None
        candidates = self.guard.candidates(at_step)
        if not candidates:
            return None
        source = find_restore_source(candidates, self._snapshot, self.store, self._on_corrupt)
        payload = source.payload
        policy_net.load_state_dict(payload["policy_state_dict"])
        if value_net is not None and payload.get("value_state_dict") is not None:
            value_net.load_state_dict(payload["value_state_dict"])
        saved_optimizer = payload["optimizer_state_dict"]
        if not (source.from_memory and copy_optimizer_state_(optimizer, saved_optimizer)):
            # Deep copy: Optimizer.load_state_dict aliases same-device tensors, so the next
            # step would mutate the snapshot (research note §6.1).
            optimizer.load_state_dict(copy.deepcopy(saved_optimizer))
        optimizer.zero_grad(set_to_none=True)
        policy_net.zero_grad(set_to_none=True)
        if value_net is not None:
            value_net.zero_grad(set_to_none=True)
        if "rng" in payload:
            restore_rng_state(payload["rng"])
        record = source.record
        if trigger is not None:
            event = self.guard.record_rollback(
                at_step, record, trigger, from_memory=source.from_memory
            )
            self._record_event(event)
            self.observers.on_rollback(at_step, record.step, trigger.reason.value)
        log.warning(format_rolled_back(record))
        return record

    def _on_corrupt(self, record: CheckpointRecord, error: CheckpointCorruptError) -> None:
        log.error("%s; falling back to the next older checkpoint.", error)
        self.guard.set_status(record.step, CheckpointStatus.CORRUPT)
        self.observers.on_checkpoint_error(record.step, error)

    def _record_event(self, event: Mapping[str, Any]) -> None:
        def add() -> None:
            self.store.add_event(event)

        if self.writer is not None:
            self.writer.run_later(int(event["at_step"]), add)
        else:
            add()

    def _latest_step(self) -> int:
        return self.guard.ledger[-1].step if self.guard.ledger else 0

    # ------------------------------------------------------------------ queries
    def list_checkpoints(self) -> list[CheckpointRecord]:
        """Committed checkpoints, oldest first (waits for pending writes)."""
        self.flush()
        return self.store.records()

    def find_stable_checkpoint(self, before_step: int | None = None) -> CheckpointRecord | None:
        """The checkpoint a rollback at ``before_step`` (default: now) would restore."""
        step = self._latest_step() if before_step is None else before_step
        return self.guard.target(step)

    @property
    def rollback_count(self) -> int:
        """Rollbacks performed so far."""
        return self.guard.rollback_count

    @property
    def rollback_events(self) -> list[dict[str, Any]]:
        """Performed rollbacks as ``{"at_step", "to_step", "reason", ...}`` dicts."""
        return self.guard.rollback_events

    def flush(self) -> None:
        """Wait until every pending write is durable; report write errors."""
        if self.writer is not None:
            self.writer.flush()
            self._surface_errors(-1)

    def close(self) -> None:
        """Flush and stop the background writer."""
        self.flush()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _metrics_dict(
    loss: float,
    reward: float,
    kl: float | None,
    entropy: float | None,
    clip_fraction: float | None,
) -> dict[str, float]:
    metrics = {LOSS: float(loss), REWARD: float(reward)}
    for name, value in ((KL, kl), ("entropy", entropy), ("clip_fraction", clip_fraction)):
        if value is not None:
            metrics[name] = float(value)
    return metrics
