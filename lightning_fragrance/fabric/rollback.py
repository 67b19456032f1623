"""`FabricRollbackGuard`: periodic checkpoints and in-place rollback in a Lightning Fabric loop.

A thin driver of `lightning_fragrance.checkpointing.RollbackOrchestrator`, the same
save -> judge -> roll back -> record sequence the Trainer callback and `CheckpointManager` drive.
A hand-written Fabric loop has no hooks, so the loop makes one explicit call per step::

    guard = FabricRollbackGuard(fabric, "checkpoints", save_every_n_steps=500)
    state = {"model": model, "optimizer": optimizer}     # what fabric.save would take
    guard.start(state)
    for step in range(1, n_updates + 1):
        metrics = ppo_update()                           # {"train/loss": ..., "train/kl": ...}
        guard.step(step, metrics, state)                 # judge, roll back or save

This module only translates: metrics into dated readings, Fabric's collectives into rank
agreement (one packed all-reduce with ``max``, `lightning_fragrance.checkpointing.agreement`),
Fabric's state into a `StateProvider` (`FabricState`). Rank 0 writes; every rank keeps its own
in-memory snapshot of the same step.

Under ``ModelParallelStrategy`` (FSDP2) each rank holds a shard of the model: every save and
rollback is then collective through `ShardedCheckpointer` (each rank writes and reloads its own
shard with torch.distributed.checkpoint, rank 0 commits after all wrote, sha256 before any read),
in the layout ``fabric.save`` writes for that strategy (`ShardedFabricState`).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import uuid
import weakref
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import fsspec
import torch
from lightning.fabric import Fabric

from lightning_fragrance.callbacks.trainer_state import scale_learning_rates
from lightning_fragrance.checkpointing import (
    CheckpointCorruptError,
    CheckpointDirectoryError,
    CheckpointError,
    CheckpointObserver,
    CheckpointRecord,
    CheckpointStatus,
    CheckpointStore,
    LoggingObserver,
    ObserverGroup,
    Reading,
    RollbackConditions,
    RollbackGuard,
    RollbackOrchestrator,
    StepOutcome,
    agreement,
    next_save_step,
    shared_view,
)
from lightning_fragrance.checkpointing.rng import reseed as reseed_generators
from lightning_fragrance.checkpointing.sharded import ShardedCheckpointer
from lightning_fragrance.checkpointing.triggers import GRAD_NORM, KL, LOSS, REWARD
from lightning_fragrance.fabric.sharded_state import ShardedFabricState, saves_sharded
from lightning_fragrance.fabric.state import FabricState

log = logging.getLogger("lightning_fragrance.fabric")

MetricValue = Reading | float | int | torch.Tensor
"""A watched value: a number or 0-d tensor (produced at this step), or a dated `Reading`."""


class FabricRollbackGuard:
    """Checkpoint every N steps; when training diverges, roll every rank back in place.

    Construct it, call `start` and `step` on every rank (they run collectives). A *step* is
    whatever the loop counts (a PPO update, an optimizer step); it must grow by at least one
    per `step` call and keeps counting through rollbacks, which are events, not rewinds.

    The files are what ``fabric.save(path, state)`` writes (plus the saving rank's RNG under
    ``lightning_fragrance_rng``), load with ``torch.load(weights_only=True)`` and with
    ``fabric.load(path, state)``; ``checkpoint_history.json`` beside them is the commit record.
    Under ``ModelParallelStrategy`` (FSDP2) a checkpoint is a directory, ``checkpoint_step_N/``,
    with one shard file per rank (what ``fabric.save`` writes for that strategy); every save
    and rollback is then collective and reads no in-memory snapshot. `load` restores a
    checkpoint of the history after checking its sha256 (a resumed run's first call).

    Args:
        fabric: The launched Fabric (``fabric.launch()`` already called).
        dirpath: Directory or fsspec URL of the checkpoints (``s3://bucket/run/checkpoints``).
        save_every_n_steps: Save at the first step at or past each multiple of this.
        max_checkpoints: Unpinned checkpoints kept; older ones are deleted after a newer commit.
        rollback_conditions: Triggers and policies (default: the operations guide's thresholds
            with known-good targets, see `RollbackConditions`).
        loss_key: Key of the loss in the metrics given to `step`.
        reward_key: Key of the reward.
        kl_key: Key of the KL divergence.
        grad_norm_key: Key of the gradient norm (read only with a ``grad_norm_threshold``).
        observers: Told about saves, rollbacks and errors, besides the logging observer that is
            always attached.
        fs: Optional fsspec filesystem; ``dirpath`` is then a path on it.
        async_save: Write files in the background on rank 0; the step pays for a CPU copy
            (sharded runs: every rank writes its shard synchronously).
        keep_in_memory: Keep the newest save in memory (per rank) for instant rollbacks
            (sharded runs: rollbacks load the verified shards in place instead).
        dry_run: Judge and record triggers but never restore (calibrating thresholds).
        resume: Continue the history already in ``dirpath`` (its checkpoints stay targets).
        overwrite: Start a new history in a directory holding another run's (set aside).
        run_id: This run's identity in the history (default: random; kept on resume).
        host_memory_budget: Host bytes the guard may hold in copies of the training state
            (staged saves, the in-memory snapshot), per rank; None = one copy. Below one copy,
            saves are written synchronously and rollbacks read the file.
        lr_factor: After each rollback, multiply the learning rate of every optimizer in the
            state (and the ``base_lrs`` of its schedulers, so schedules do not undo it) by this.
        reseed: After each rollback, reseed torch/numpy/python (per rank) so the restored run
            does not replay the same random draws into the same divergence.

    Raises:
        CheckpointDirectoryError: ``dirpath`` holds another run's history, or is not a local
            (or shared, mounted) path under a sharded strategy (on every rank).
        ValueError: A sharded strategy set to gather the full state on rank 0.
        NotImplementedError: DeepSpeed or another strategy whose shards the guard cannot save.
    """

    def __init__(
        self,
        fabric: Fabric,
        dirpath: str | os.PathLike[str],
        save_every_n_steps: int = 500,
        max_checkpoints: int = 5,
        rollback_conditions: RollbackConditions | None = None,
        *,
        loss_key: str = "train/loss",
        reward_key: str = "train/reward",
        kl_key: str = "train/kl",
        grad_norm_key: str = "train/grad_norm",
        observers: Iterable[CheckpointObserver] | None = None,
        fs: fsspec.AbstractFileSystem | None = None,
        async_save: bool = True,
        keep_in_memory: bool = True,
        dry_run: bool = False,
        resume: bool = False,
        overwrite: bool = False,
        run_id: str | None = None,
        host_memory_budget: float | None = None,
        lr_factor: float = 1.0,
        reseed: bool = False,
    ) -> None:
        if save_every_n_steps < 1:
            raise ValueError(f"save_every_n_steps={save_every_n_steps} must be >= 1")
        if not lr_factor > 0:
            raise ValueError(f"lr_factor={lr_factor} must be > 0")
        # Before any collective: every rank raises the same refusal instead of hanging.
        self.sharded = saves_sharded(fabric.strategy, type(self).__name__)
        self.lr_factor, self.reseed = lr_factor, reseed
        self.fabric = fabric
        self.conditions = rollback_conditions or RollbackConditions()
        self.keys = {LOSS: loss_key, REWARD: reward_key, KL: kl_key}
        if self.conditions.grad_norm_threshold is not None:
            self.keys[GRAD_NORM] = grad_norm_key
        self.observers = ObserverGroup([LoggingObserver(), *(observers or ())])
        store = self._open_store(os.fspath(dirpath), max_checkpoints, fs, resume, overwrite, run_id)
        self.engine = RollbackOrchestrator(
            store,
            self.conditions,
            save_every=save_every_n_steps,
            observers=self.observers,
            run_id=store.run_id,
            is_writer=fabric.is_global_zero,
            async_save=async_save,
            keep_in_memory=keep_in_memory,
            dry_run=dry_run,
            barrier=fabric.barrier,
            host_memory_budget=host_memory_budget,
            sharded=ShardedCheckpointer(store) if self.sharded else None,
        )
        if resume:  # a resumed history keeps its targets and its save schedule
            self.engine.guard.ledger = store.records()
            if self.engine.guard.ledger:
                newest = self.engine.guard.ledger[-1].step
                self.engine.next_save = next_save_step(newest, save_every_n_steps)
        self._started = False
        self._warned_missing = False
        # Loops rarely call close(): flush rank 0's pending writes at interpreter exit (the
        # writer thread is a daemon and would die mid-write). Weak, so it keeps nothing alive.
        self._atexit = _close_at_exit(self)

    def _open_store(
        self,
        dirpath: str,
        max_checkpoints: int,
        fs: fsspec.AbstractFileSystem | None,
        resume: bool,
        overwrite: bool,
        run_id: str | None,
    ) -> CheckpointStore:
        """Rank 0 claims the directory for this run; the others open it read-only after it.
        A refusal is broadcast, so every rank raises it instead of waiting at a barrier."""
        fabric, store, refusal = self.fabric, None, ""
        if fabric.is_global_zero:
            try:
                store = CheckpointStore(dirpath, max_checkpoints, fs=fs)
                if self.sharded:  # DCP's file writer needs a local or shared POSIX path
                    store.staging_directory(0)
                if resume and run_id is None and store.run_id:
                    run_id = store.run_id
                run_id = run_id or uuid.uuid4().hex[:12]
                store.claim(run_id, resume=resume, overwrite=overwrite)
            except CheckpointError as err:
                refusal = f"{type(self).__name__}: {err}"
        refusal = fabric.broadcast(refusal, src=0)
        if refusal:
            raise CheckpointDirectoryError(refusal)
        run_id = fabric.broadcast(run_id, src=0)
        if store is None:
            store = CheckpointStore(dirpath, max_checkpoints, fs=fs, read_only=True)
        if fabric.world_size > 1:  # every rank must read what rank 0 writes
            sees = fabric.is_global_zero or shared_view.sees_run(store, str(run_id))
            vector = shared_view.blindness(fabric.global_rank, fabric.world_size, sees)
            mine = torch.tensor(vector, dtype=torch.float64, device=fabric.device)
            reduced = fabric.all_reduce(mine, reduce_op="max")
            assert isinstance(reduced, torch.Tensor)  # a tensor in, a tensor out
            blind = shared_view.blind_ranks(reduced.tolist())
            if blind:
                owner = type(self).__name__
                message = shared_view.not_shared_message(owner, dirpath, blind, fabric.world_size)
                raise CheckpointDirectoryError(message)
        store.run_id = str(run_id)
        return store

    # ------------------------------------------------------------------ the loop's calls
    def start(self, state: MutableMapping[str, Any], step: int = 0) -> CheckpointRecord | None:
        """Take the state the loop starts from as the rollback target of last resort (with
        known-good targets), so a fault before the first save has somewhere to go. Call it once,
        before the first update, on every rank. Nothing is saved on a resumed run whose history
        already holds a target at or before ``step``."""
        self._started = True
        return self.engine.start(step, self._provider(state))

    def step(
        self, step: int, metrics: Mapping[str, MetricValue], state: MutableMapping[str, Any]
    ) -> StepOutcome:
        """Judge this step's metrics on every rank alike; roll back on a fire, else save when due.

        Args:
            step: The step now (after its update).
            metrics: The watched values by key (``train/loss``, ``train/reward``, ``train/kl``
                by default); numbers and 0-d tensors are dated to ``step``, a `Reading` carries
                its own production step (a reward logged once per rollout). Other keys are
                ignored, so the dict given to ``fabric.log_dict`` can be passed as it is.
            state: The loop's state, as for ``fabric.save`` (the same keys every call).

        Returns:
            What happened: ``outcome.restored`` is the checkpoint restored on every rank (the
            live objects in ``state`` already hold it), ``outcome.saved`` the one saved.

        Raises:
            RollbackBudgetExceeded: One more rollback would exceed the budget (every rank).
            NoGoodCheckpointError: Targets exist but none is intact.
        """
        if not self._started:
            log.info("No start() call: the state at step %d is this run's first target.", step)
            self.start(state, step)
        readings = self._agree(self._readings(step, metrics))
        provider = self._provider(state)
        return self.engine.step(step, readings, provider, lambda: self._remedies(step, provider))

    def load(self, state: MutableMapping[str, Any], step: int | None = None) -> CheckpointRecord:
        """Restore a checkpoint of the history into ``state`` in place, on every rank.

        The way to resume (with ``resume=True``): every file is checked against its sha256
        before anything reads it (DCP's ``.metadata`` is a pickle), which ``fabric.load`` does
        not do. Then call ``start(state, record.step)`` and continue counting from there.

        Args:
            state: The loop's state, as for `step`.
            step: The checkpoint to load; None = the newest one not marked corrupt or rejected,
                falling back to the next older one when its files fail their check.

        Returns:
            The record restored (``record.step`` is the step the state now holds).

        Raises:
            CheckpointError: The history lists no such checkpoint.
            CheckpointCorruptError: Its files (with ``step=None``: every candidate's) failed
                their check; nothing of them was read.
        """
        self.flush()
        self.fabric.barrier()  # rank 0's history is complete before the others read it
        if not self.fabric.is_global_zero:
            self.store.refresh()
        unusable = {CheckpointStatus.CORRUPT.value, CheckpointStatus.REJECTED.value}
        records = [
            r
            for r in self.store.records()
            if (r.step == step if step is not None else r.status not in unusable)
        ]
        if not records:
            wanted = f"checkpoint of step {step}" if step is not None else "intact checkpoint"
            raise CheckpointError(
                f"{type(self).__name__}.load: {self.store.history_path} lists no {wanted} "
                f"(its steps: {[r.step for r in self.store.records()]})."
            )
        provider = self._provider(state)
        problems: list[str] = []
        for record in reversed(records):
            try:
                self._load_record(record, provider)
            except CheckpointCorruptError as err:
                problems.append(str(err))
                self.engine.guard.set_status(record.step, CheckpointStatus.CORRUPT, str(err))
                if self.fabric.is_global_zero:
                    self.store.mark_corrupt(record.step, str(err))
                continue
            self.engine.next_save = next_save_step(record.step, self.engine.save_every)
            return record
        raise CheckpointCorruptError(
            f"{type(self).__name__}.load: no intact checkpoint to load ({'; '.join(problems)}). "
            "Nothing was read from the damaged files; `lf-checkpoints verify` lists intact ones."
        )

    def _load_record(self, record: CheckpointRecord, provider: FabricState) -> None:
        """Load one checkpoint on every rank, or raise the same error on every rank."""
        if self.engine.sharded is not None:
            assert isinstance(provider, ShardedFabricState)
            self.engine.sharded.load(record, provider)  # collective, verified first
            return
        failure, payload = "", None
        try:
            payload = self.store.load(record)  # sha256, then torch.load(weights_only=True)
        except CheckpointCorruptError as err:
            failure = str(err)
        if self.fabric.world_size > 1:  # a file one rank cannot read fails every rank
            flag = torch.tensor([1.0 if failure else 0.0], device=self.fabric.device)
            reduced = self.fabric.all_reduce(flag, reduce_op="max")
            assert isinstance(reduced, torch.Tensor)
            if float(reduced.item()) > 0 and not failure:
                failure = f"{record.file} (step {record.step}) failed its check on another rank"
        if failure or payload is None:
            raise CheckpointCorruptError(failure)
        provider.restore(payload, from_memory=False)

    def _provider(self, state: MutableMapping[str, Any]) -> FabricState:
        if self.sharded:
            return ShardedFabricState(self.fabric, state)
        return FabricState(self.fabric, state)

    def _remedies(self, step: int, provider: FabricState) -> dict[str, Any]:
        """Applied on every rank right after a restore; recorded with the rollback event."""
        applied: dict[str, Any] = {}
        if self.lr_factor != 1.0:
            scale_learning_rates(
                provider.optimizers(),
                [_Scheduled(s) for s in provider.schedulers()],
                self.lr_factor,
            )
            applied["lr_factor"] = self.lr_factor
        if self.reseed:
            seed = step * 1_000_003 + self.rollback_count * 7919 + self.fabric.global_rank
            reseed_generators(seed)
            applied["reseed"] = seed % (2**32)
        return applied

    def _readings(self, step: int, metrics: Mapping[str, MetricValue]) -> dict[str, Reading]:
        readings: dict[str, Reading] = {}
        for signal, key in self.keys.items():
            value = metrics.get(key)
            if value is None:
                continue
            if isinstance(value, Reading):
                readings[signal] = value
            else:
                number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
                readings[signal] = Reading(number, step)
        missing = [key for key in self.keys.values() if key not in metrics]
        if missing and not self._warned_missing and self.fabric.is_global_zero:
            self._warned_missing = True
            log.warning(
                "%s.step got no %s (metrics given: %s): their triggers are inactive until they "
                "appear. Pass them, or set loss_key/reward_key/kl_key to the names you use.",
                type(self).__name__,
                missing,
                sorted(metrics),
            )
        return readings

    def _agree(self, readings: dict[str, Reading]) -> dict[str, Reading]:
        """Make every rank judge the same readings: one packed all-reduce (max) per step, so a
        spike seen by one rank rolls every rank back to the same step (research note §3.3)."""
        if self.fabric.world_size <= 1:
            return readings
        names = list(self.keys)
        packed = torch.tensor(
            agreement.pack(names, readings), dtype=torch.float64, device=self.fabric.device
        )
        reduced = self.fabric.all_reduce(packed, reduce_op="max")
        assert isinstance(reduced, torch.Tensor)
        return agreement.unpack(names, reduced.tolist())

    # ------------------------------------------------------------------ queries and tear-down
    @property
    def store(self) -> CheckpointStore:
        """The checkpoint store."""
        return self.engine.store

    @property
    def guard(self) -> RollbackGuard:
        """The `RollbackGuard` holding the ledger and the decisions."""
        return self.engine.guard

    @property
    def history(self) -> list[CheckpointRecord]:
        """Committed checkpoints, oldest first (waits for rank 0's pending writes)."""
        self.flush()
        return self.store.records()

    @property
    def rollback_count(self) -> int:
        """Restores performed (dry-run triggers excluded)."""
        return self.engine.guard.rollback_count

    @property
    def rollback_events(self) -> list[dict[str, Any]]:
        """Performed rollbacks: ``{"at_step", "to_step", "reason", "message", ...}``."""
        return self.engine.guard.rollback_events

    def flush(self) -> None:
        """Wait until every pending checkpoint write is durable (rank 0)."""
        self.engine.flush()

    def close(self) -> None:
        """Flush and stop the background writer (idempotent)."""
        self.engine.close()
        atexit.unregister(self._atexit)

    def __enter__(self) -> FabricRollbackGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class _Scheduled:
    """The one attribute `scale_learning_rates` reads of a Trainer's scheduler config."""

    scheduler: Any


def _close_at_exit(guard: FabricRollbackGuard) -> Any:
    ref = weakref.ref(guard)

    def close() -> None:
        alive = ref()
        if alive is not None:
            alive.engine.close()

    atexit.register(close)
    return close
