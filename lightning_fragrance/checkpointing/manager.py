"""`CheckpointManager`: the operations guide's API for a plain PyTorch training loop.

Usage (the guide's loop)::

    manager = CheckpointManager("checkpoints", save_interval=500, max_checkpoints=5)
    for step in range(1, n_steps + 1):
        loss, reward, kl = train_step()
        should_rollback, checkpoint, reason = manager.check_rollback(step, loss, reward, kl)
        if should_rollback:
            print(f"[롤백 트리거] {reason}")      # loss spike 0.50 -> 1.20 (2.40x)
            manager.rollback(policy_net, value_net, optimizer)
        elif manager.should_save(step):
            manager.save_checkpoint(step, policy_net, value_net, optimizer, loss, reward, kl)

A thin driver of `RollbackOrchestrator`, the same sequence the Lightning callback drives. Pending
background writes are flushed at interpreter exit too, so the guide's loop, which never calls
`close()`, keeps its last checkpoint.
"""

from __future__ import annotations

import atexit
import copy
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import fsspec
import torch
from torch import nn

from lightning_fragrance.checkpointing.conditions import RollbackConditions
from lightning_fragrance.checkpointing.errors import CheckpointError
from lightning_fragrance.checkpointing.observers import (
    CheckpointObserver,
    LoggingObserver,
    ObserverGroup,
)
from lightning_fragrance.checkpointing.optimizer_state import copy_optimizer_state_
from lightning_fragrance.checkpointing.orchestrator import (
    RollbackOrchestrator,
    format_rolled_back,
    next_save_step,
    non_finite_parameter,
)
from lightning_fragrance.checkpointing.records import (
    CheckpointRecord,
    Reading,
    RollbackDecision,
    Trigger,
)
from lightning_fragrance.checkpointing.rng import collect_rng_state, restore_rng_state
from lightning_fragrance.checkpointing.store import CheckpointStore
from lightning_fragrance.checkpointing.triggers import KL, LOSS, REWARD
from lightning_fragrance.labels import RollbackReason

__all__ = ["CheckpointManager", "format_rolled_back", "next_save_step"]


class _Nets:
    """`StateProvider` over the guide's policy net, value net and optimizer."""

    def __init__(
        self, policy: nn.Module, value: nn.Module | None, optimizer: torch.optim.Optimizer
    ) -> None:
        self.policy, self.value, self.optimizer = policy, value, optimizer
        self.extra: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}

    def capture(self) -> Mapping[str, Any]:
        return {
            "policy_state_dict": self.policy.state_dict(),
            "value_state_dict": self.value.state_dict() if self.value is not None else None,
            "optimizer_state_dict": self.optimizer.state_dict(),
            "metrics": dict(self.metrics),
            "rng": collect_rng_state(),
            "extra": self.extra,
        }

    def restore(self, state: Mapping[str, Any], from_memory: bool) -> None:
        self.policy.load_state_dict(state["policy_state_dict"])
        if self.value is not None and state.get("value_state_dict") is not None:
            self.value.load_state_dict(state["value_state_dict"])
        saved = state["optimizer_state_dict"]
        # Copied into the live moments whatever the source: no second copy of the optimizer
        # state in memory (the guard's budget is one copy, issue 12 item 4).
        if not copy_optimizer_state_(self.optimizer, saved):
            # Deep copy of a snapshot: Optimizer.load_state_dict aliases same-device tensors,
            # so the next step would mutate it (research note §6.1).
            self.optimizer.load_state_dict(copy.deepcopy(saved) if from_memory else saved)
        self.optimizer.zero_grad(set_to_none=True)
        for net in (self.policy, self.value):
            if net is not None:
                net.zero_grad(set_to_none=True)
        if "rng" in state:
            restore_rng_state(state["rng"])

    def parameters(self) -> Iterator[torch.Tensor]:
        yield from self.policy.parameters()
        if self.value is not None:
            yield from self.value.parameters()


class CheckpointManager:
    """Periodic checkpoints and automatic rollback for a plain PyTorch loop.

    Args:
        checkpoint_dir: Local directory or fsspec URL.
        save_interval: Save at the first step at or past each multiple of this. With
            ``certify``, the first healthy step is saved too, so a fault before the first
            interval has a known-good state to return to.
        max_checkpoints: Unpinned checkpoints kept on disk.
        rollback_conditions: Triggers and policies (thresholds: the guide's; targets:
            known-good, see `RollbackConditions.certify`).
        observers: Told about saves, rollbacks and errors, besides the `LoggingObserver` that is
            always attached (errors are never silent).
        fs: Optional fsspec filesystem (``checkpoint_dir`` is then a path on it).
        async_save: Write in a background thread (the loop only pays for a CPU copy).
        keep_in_memory: Keep the last saved state in memory for instant rollbacks.
        resume: Continue the history already in ``checkpoint_dir`` (its checkpoints stay
            rollback targets). Without it, another run's history there is refused.
        overwrite: Start a new history in a directory holding another run's (set aside).
        run_id: This run's identity in the history (default: random; kept on resume).
        read_only: Open an existing history without writing anything (a read-only filesystem,
            inspection, rolling back from it): list, load and rollback work, statuses and
            events stay in memory, `save_checkpoint` raises `CheckpointError`.
        host_memory_budget: Host bytes the manager may hold in copies of the training state
            (staged saves, the snapshot); None = one copy. Below one copy, saves are written
            synchronously and rollbacks read the file (a warning says so, with the numbers).
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
        resume: bool = False,
        overwrite: bool = False,
        run_id: str | None = None,
        read_only: bool = False,
        host_memory_budget: float | None = None,
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval={save_interval} must be >= 1")
        self.save_interval = save_interval
        self.conditions = rollback_conditions or RollbackConditions()
        self.observers = ObserverGroup([LoggingObserver(), *(observers or ())])
        self.read_only = read_only
        self.store = CheckpointStore(
            str(checkpoint_dir), max_checkpoints, fs=fs, read_only=read_only
        )
        if (resume or read_only) and run_id is None and self.store.run_id:
            run_id = self.store.run_id
        run_id = run_id or uuid.uuid4().hex[:12]
        if not read_only:
            self.store.claim(run_id, resume=resume, overwrite=overwrite)
        self.engine = RollbackOrchestrator(
            self.store,
            self.conditions,
            save_every=save_interval,
            observers=self.observers,
            run_id=run_id,
            async_save=async_save,
            keep_in_memory=keep_in_memory,
            host_memory_budget=host_memory_budget,
        )
        self.guard = self.engine.guard
        self.guard.ledger = self.store.records()  # a resumed history keeps its targets
        newest = self.guard.ledger[-1].step if self.guard.ledger else 0
        self.engine.next_save = next_save_step(newest, save_interval) if newest else save_interval
        self._pending: tuple[int, Trigger] | None = None
        self._last_step = newest
        # The guide's loop never calls close(): flush pending writes at interpreter exit (the
        # writer thread is a daemon and would die mid-write). A weak reference, so registering
        # does not keep the manager alive.
        self._atexit = _flush_at_exit(self)

    @property
    def writer(self) -> Any:
        """The background writer (None when ``async_save=False``)."""
        return self.engine.writer

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        """Whether to save at ``step``: at or past the next save point, or (known-good
        targets) the first healthy step while nothing is saved; never on a suspicious step."""
        if self.engine.guard.suspicious:
            return False
        first = self.conditions.certify and not self.guard.ledger and bool(self.guard.last_judged)
        return first or step >= self.engine.next_save

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
        """Save the training state of ``step`` with its metrics; returns the file's path/URL
        (empty when the weights were non-finite and nothing was saved: the next
        `check_rollback` then rolls back).

        Numeric ``extra`` values join the metrics; others are stored as they are (they must be
        weights_only-safe: numbers, strings, lists, dicts, tensors).
        """
        if self.read_only:
            raise CheckpointError(
                f"CheckpointManager({self.store.directory!r}) was opened read_only=True: "
                f"step {step} cannot be saved. Open it writable or save to another directory."
            )
        provider = _Nets(policy_net, value_net, optimizer)
        bad = non_finite_parameter(provider.parameters())
        if bad is not None:
            self.engine.refuse_save(
                step,
                Trigger(
                    RollbackReason.NON_FINITE,
                    f"non-finite parameters (tensor #{bad}) at step {step}",
                    "parameters",
                    float("nan"),
                ),
            )
            return ""
        metrics = _metrics_dict(loss, reward, kl_divergence, entropy, clip_fraction)
        for key, value in extra.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = float(value)
            else:
                provider.extra[key] = value
        provider.metrics = metrics
        record = self.engine.save(step, provider, metrics)
        self._last_step = max(self._last_step, step)
        return self.store.url(record.file)

    # ------------------------------------------------------------------ judging
    def check_rollback(
        self,
        current_step: int,
        current_loss: float,
        current_reward: float,
        current_kl_divergence: float | None = None,
        produced_at: int | None = None,
        **metrics: float,
    ) -> RollbackDecision:
        """Judge the step's values against the checkpoint a rollback would restore.

        Args:
            current_step: The training step now.
            current_loss: Loss of this step.
            current_reward: Reward of this step.
            current_kl_divergence: KL of this step's update, if measured.
            produced_at: The step at which these values were produced (default
                ``current_step``, as in the guide's loop). Values not newer than the last
                judged ones, or older than the last rollback, are not judged again.
            **metrics: Extra signals for the optional triggers (e.g. ``grad_norm=``).

        Returns:
            ``(should_rollback, checkpoint, reason)``; ``str(reason)`` is the guide-style
            message, ``reason.code`` the `RollbackReason` value.

        Raises:
            RollbackBudgetExceeded: The trigger fired but the rollback budget is spent.
        """
        at = current_step if produced_at is None else produced_at
        values = _metrics_dict(current_loss, current_reward, current_kl_divergence, None, None)
        values.update({k: float(v) for k, v in metrics.items()})
        readings = {name: Reading(value, at) for name, value in values.items()}
        self._last_step = max(self._last_step, current_step)
        observation = self.engine.judge(current_step, readings)
        trigger = observation.trigger
        if not observation.fire or trigger is None:
            return RollbackDecision(False, None, None)
        target = self.engine.prepare(current_step, trigger)
        if target is None:
            self._pending = None
            return RollbackDecision(True, None, trigger)
        self._pending = (current_step, trigger)
        return RollbackDecision(True, self.store.record(target.step) or target, trigger)

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
            The restored checkpoint, or None when there is nothing to restore.

        Raises:
            NoGoodCheckpointError: Checkpoints exist but none is intact.
        """
        at_step, trigger = self._pending or (self._last_step, None)
        self._pending = None
        provider = _Nets(policy_net, value_net, optimizer)
        if trigger is None:  # a rollback the guard did not ask for: an operator's
            trigger = Trigger(RollbackReason.MANUAL, "manual rollback", "manual", 0.0)
        return self.engine.restore(at_step, trigger, provider)

    # ------------------------------------------------------------------ queries
    def list_checkpoints(self) -> list[CheckpointRecord]:
        """Committed checkpoints, oldest first (waits for pending writes)."""
        self.flush()
        return self.store.records()

    def find_stable_checkpoint(self, before_step: int | None = None) -> CheckpointRecord | None:
        """The checkpoint a rollback at ``before_step`` (default: now) would restore."""
        return self.guard.target(self._last_step if before_step is None else before_step)

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
        self.engine.flush()

    def close(self) -> None:
        """Flush and stop the background writer."""
        self.engine.close()
        atexit.unregister(self._atexit)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flush_at_exit(manager: CheckpointManager) -> Any:
    ref = weakref.ref(manager)

    def flush() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    atexit.register(flush)
    return flush


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
