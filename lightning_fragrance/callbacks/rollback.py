"""`RollbackCheckpoint`: periodic checkpoints and in-place rollback on divergence, for Lightning.

A thin adapter: every rule lives in `lightning_fragrance.checkpointing` (triggers, certification,
escalation, budget, atomic store, ordered background writer); this module reads the metrics from
the Trainer's hooks, agrees on a decision across ranks and restores the training state through
public `Strategy` methods (the sequence Lightning runs on resume, minus the loops).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fsspec
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from typing_extensions import override

from lightning_fragrance.checkpointing import (
    AsyncCheckpointWriter,
    CheckpointCorruptError,
    CheckpointObserver,
    CheckpointRecord,
    CheckpointStatus,
    CheckpointStore,
    LoggingObserver,
    MissingMetricError,
    Observation,
    ObserverGroup,
    RollbackBudgetExceeded,
    RollbackConditions,
    RollbackGuard,
    Snapshot,
    StagingPool,
    collect_rng_state,
    find_restore_source,
    next_save_step,
    reseed,
    restore_rng_state,
)
from lightning_fragrance.checkpointing.manager import format_rolled_back
from lightning_fragrance.checkpointing.optimizer_state import copy_optimizer_state_
from lightning_fragrance.checkpointing.triggers import GRAD_NORM, KL, LOSS, REWARD

log = logging.getLogger("lightning_fragrance.callbacks.rollback")

RNG_KEY = "lightning_fragrance_rng"
"""Key under which every checkpoint written while this callback is active carries the RNG state
of rank 0 (Lightning checkpoints carry none, research note §1.2)."""

STATE_VERSION = 1
_MISSING = -math.inf


class RollbackCheckpoint(Checkpoint):
    r"""Checkpoint every N optimizer steps; when training diverges, roll back in place and go on.

    A *step* is an optimizer step: ``trainer.global_step``. With gradient accumulation several
    batches make one step; with manual optimization (PPO) one batch can make several. Metrics are
    judged once per step (on the batch where ``global_step`` advanced), and a save happens at the
    first step at or past each multiple of ``save_every_n_steps``. ``global_step`` keeps counting
    through rollbacks: they are events, not rewinds of the loops.

    The files are standard Lightning checkpoints (``Trainer.fit(ckpt_path=...)`` resumes them,
    with this callback's history, counters and budget) that load with
    ``torch.load(weights_only=True)``; ``checkpoint_history.json`` beside them is the commit record.

    Args:
        dirpath: Directory or fsspec URL of the checkpoints (relative paths are relative to the
            working directory).
        save_every_n_steps: Save at the first step at or past each multiple of this.
        max_checkpoints: Unpinned checkpoints kept; older ones are deleted after a newer commit.
        kl_threshold: Roll back when KL > this (absolute). See `RollbackConditions`.
        loss_increase_multiplier: Roll back when ``|loss| > multiplier x |baseline loss|``.
        reward_drop_threshold: Roll back when reward fell by more than this fraction.
        baseline: ``"checkpoint"`` (the guide: metrics of the rollback target) or
            ``"window_median"`` (median of the last ``window`` healthy steps).
        window: Healthy steps in the median window (also its warm-up).
        patience: Consecutive bad steps before acting (non-finite values act at once).
        min_baseline_magnitude: Floor of ``|baseline|`` for the ratio triggers.
        grad_norm_threshold: Optional multiple of the baseline gradient norm that triggers. When
            ``grad_norm_key`` is not logged, the callback measures the norm itself (pre-clip).
        certify_after_steps: Steps without a bad step before a checkpoint is a preferred target.
        escalate_within_steps: A trigger this soon after a rollback restores an older checkpoint.
        max_rollbacks: Rollbacks allowed within ``rollback_budget_window`` steps; one more
            raises `RollbackBudgetExceeded` and the fit stops. None = unlimited.
        rollback_budget_window: Width of the budget window in steps.
        loss_key: Metric read for the loss: first in the dict returned by ``training_step``,
            then in ``trainer.callback_metrics`` (what ``self.log`` recorded).
        reward_key: Same, for the reward.
        kl_key: Same, for the KL divergence.
        grad_norm_key: Same, for the gradient norm (only read when ``grad_norm_threshold``).
        dry_run: Judge and record triggers but never restore: calibrate thresholds on a healthy
            run, then switch it off.
        strict: Raise `MissingMetricError` when a key is missing instead of warning once.
        lr_factor: After each rollback, multiply every learning rate (and the schedulers'
            ``base_lrs``, so schedules do not undo it) by this. 1.0 = unchanged.
        reseed: After each rollback, reseed torch/numpy/python so the restored run does not
            replay the same random draws (dropout, sampling) into the same divergence.
        skip_batches: After each rollback, the next N optimizer steps make no update (their
            gradients are dropped in ``on_before_optimizer_step``), so the data window that led
            to the divergence is consumed without being learned from.
        async_save: Write files in the background; the step only pays for a CPU copy.
        keep_in_memory: Keep the last saved state in memory (per rank) for instant rollbacks.
        restore_scheduler: Restore LR schedulers with the rest (exact state). False keeps the
            schedule aligned with ``global_step`` instead.
        restore_precision: Restore the precision plugin state (GradScaler scale). False keeps
            the current, lower scale after an overflow-driven divergence.
        observers: Told about saves, rollbacks and errors, besides the logging observer that is
            always attached.
        fs: Optional fsspec filesystem; ``dirpath`` is then a path on it.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = "checkpoints",
        save_every_n_steps: int = 500,
        max_checkpoints: int = 5,
        kl_threshold: float = 0.03,
        loss_increase_multiplier: float = 2.0,
        reward_drop_threshold: float = 0.3,
        baseline: str = "checkpoint",
        window: int = 20,
        patience: int = 1,
        min_baseline_magnitude: float = 1e-3,
        grad_norm_threshold: float | None = None,
        certify_after_steps: int = 0,
        escalate_within_steps: int = 0,
        max_rollbacks: int | None = 3,
        rollback_budget_window: int = 1000,
        loss_key: str = "train/loss",
        reward_key: str = "train/reward",
        kl_key: str = "train/kl",
        grad_norm_key: str = "train/grad_norm",
        dry_run: bool = False,
        strict: bool = False,
        lr_factor: float = 1.0,
        reseed: bool = False,
        skip_batches: int = 0,
        async_save: bool = True,
        keep_in_memory: bool = True,
        restore_scheduler: bool = True,
        restore_precision: bool = True,
        observers: Iterable[CheckpointObserver] | None = None,
        fs: fsspec.AbstractFileSystem | None = None,
    ) -> None:
        if save_every_n_steps < 1:
            raise ValueError(f"save_every_n_steps={save_every_n_steps} must be >= 1")
        if max_checkpoints < 1:
            raise ValueError(f"max_checkpoints={max_checkpoints} must be >= 1")
        if not lr_factor > 0:
            raise ValueError(f"lr_factor={lr_factor} must be > 0")
        if skip_batches < 0:
            raise ValueError(f"skip_batches={skip_batches} must be >= 0")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.save_every_n_steps = save_every_n_steps
        self.max_checkpoints = max_checkpoints
        self.conditions = RollbackConditions(
            kl_threshold=kl_threshold,
            loss_increase_multiplier=loss_increase_multiplier,
            reward_drop_threshold=reward_drop_threshold,
            baseline=baseline,
            window=window,
            patience=patience,
            min_baseline_magnitude=min_baseline_magnitude,
            grad_norm_threshold=grad_norm_threshold,
            certify_after_steps=certify_after_steps,
            escalate_within_steps=escalate_within_steps,
            max_rollbacks=max_rollbacks,
            rollback_budget_window=rollback_budget_window,
        )
        self.keys = {LOSS: loss_key, REWARD: reward_key, KL: kl_key}
        if grad_norm_threshold is not None:
            self.keys[GRAD_NORM] = grad_norm_key
        self.dry_run = dry_run
        self.strict = strict
        self.lr_factor = lr_factor
        self.reseed = reseed
        self.skip_batches = skip_batches
        self.async_save = async_save
        self.keep_in_memory = keep_in_memory
        self.restore_scheduler = restore_scheduler
        self.restore_precision = restore_precision
        # The logging observer is always there: a write error is never silent, whatever else
        # (Prometheus) is attached.
        self.observers = ObserverGroup([LoggingObserver(), *(observers or ())])
        self._fs = fs
        self.guard = RollbackGuard(self.conditions, max_checkpoints)
        self._store: CheckpointStore | None = None
        self._writer: AsyncCheckpointWriter | None = None
        self._snapshot: Snapshot | None = None
        self._next_save = save_every_n_steps
        self._last_step = -1
        self._skip_remaining = 0
        self._warned_keys: set[str] = set()
        self._warned_no_target = False
        self._accumulated: dict[str, float] = {}
        self._staging = StagingPool()
        self._grad_norm_sq: float | None = None
        self._is_zero = True

    # ------------------------------------------------------------------ public properties
    @property
    def store(self) -> CheckpointStore:
        """The checkpoint store (available once the fit has been set up)."""
        if self._store is None:
            raise RuntimeError("RollbackCheckpoint.store is available after Trainer.fit starts")
        return self._store

    @property
    def history(self) -> list[CheckpointRecord]:
        """Committed checkpoints, oldest first (waits for pending writes)."""
        self.flush()
        return self.store.records()

    @property
    def rollback_count(self) -> int:
        """Rollbacks performed (dry-run triggers excluded)."""
        return self.guard.rollback_count

    @property
    def rollback_events(self) -> list[dict[str, Any]]:
        """Performed rollbacks: ``{"at_step", "to_step", "reason", "message", ...}``."""
        return self.guard.rollback_events

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every recorded event, dry-run triggers included."""
        return [dict(e) for e in self.guard.events]

    def flush(self) -> None:
        """Wait until every pending checkpoint write is durable (rank 0)."""
        if self._writer is not None:
            self._writer.flush()

    # ------------------------------------------------------------------ set-up / tear-down
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
        self._is_zero = trainer.is_global_zero
        # Only rank 0 writes (like Strategy.save_checkpoint); the others read after a barrier.
        self._store = CheckpointStore(
            dirpath, self.max_checkpoints, fs=self._fs, read_only=not self._is_zero
        )
        if self._is_zero and self.async_save:
            self._writer = AsyncCheckpointWriter(self._store, [self.observers])

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._writer is not None:
            self._writer.close()
            self._report_write_errors()
            self._writer = None
        self._snapshot = None  # the store stays readable: `history` after the fit

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._writer is not None:  # keep what was already staged, then stop the thread
            self._writer.close()
            self._report_write_errors()
            self._writer = None

    # ------------------------------------------------------------------ per step
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if GRAD_NORM in self.keys:
            norms = [
                p.grad.detach().norm(2)
                for g in optimizer.param_groups
                for p in g["params"]
                if p.grad is not None
            ]
            if norms:
                total = float(torch.stack(norms).norm(2)) ** 2
                self._grad_norm_sq = (self._grad_norm_sq or 0.0) + total
        if self._skip_remaining > 0:
            # Dropping the gradients makes torch optimizers skip these parameters entirely (no
            # moment update, no step count). Returning -1 from on_train_batch_start would skip
            # the rest of the epoch instead (research note §7.4).
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        metrics = _worst(self._accumulated, self._read_metrics(trainer, outputs))
        if step == self._last_step:
            # Gradient accumulation: no optimizer step on this batch. Keep the worst values so
            # a divergence in any micro-batch of the step is judged once the step happens.
            self._accumulated = metrics
            return
        self._accumulated = {}
        self._last_step = step
        if self._skip_remaining > 0:
            self._skip_remaining -= 1
        self._report_write_errors()
        metrics = self._agree(trainer, metrics)
        observation = self.guard.observe(step, metrics)
        for certified in observation.certified:
            self._store_status(certified, CheckpointStatus.CERTIFIED)
        if observation.fire:
            self._on_trigger(trainer, pl_module, step, observation)
        elif step >= self._next_save:
            self._save(trainer, step, metrics)

    # ------------------------------------------------------------------ metrics
    def _read_metrics(self, trainer: pl.Trainer, outputs: Any) -> dict[str, float]:
        """Cheapest first: the dict returned by training_step, then the logged metrics."""
        found: dict[str, Any] = {}
        logged: Mapping[str, Any] | None = None
        for name, key in self.keys.items():
            if isinstance(outputs, Mapping) and key in outputs:
                value = outputs[key]
                if key == "loss":  # Lightning divides the returned loss by the accumulation
                    value = value * trainer.accumulate_grad_batches
                found[name] = value
                continue
            if name == GRAD_NORM and self._grad_norm_sq is not None:
                continue
            if logged is None:
                logged = trainer.callback_metrics
            if key in logged:
                found[name] = logged[key]
            else:
                self._missing(key, name, outputs, logged)
        if GRAD_NORM in self.keys and GRAD_NORM not in found and self._grad_norm_sq is not None:
            found[GRAD_NORM] = math.sqrt(self._grad_norm_sq)
        self._grad_norm_sq = None
        if not any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in found.values()):
            return {name: float(value) for name, value in found.items()}
        # Device tensors: one host copy for all values (one sync, research note §4).
        names = list(found)
        stacked = torch.stack(
            [torch.as_tensor(found[n]).detach().reshape(()).to(torch.float64) for n in names]
        )
        return dict(zip(names, stacked.cpu().tolist(), strict=True))

    def _missing(self, key: str, name: str, outputs: Any, logged: Mapping[str, Any]) -> None:
        if key in self._warned_keys:
            return
        returned = sorted(outputs) if isinstance(outputs, Mapping) else []
        message = (
            f"RollbackCheckpoint: metric {key!r} ({name}) was neither returned by training_step "
            f"(returned keys: {returned}) nor logged (logged keys: {sorted(logged)}). "
            f"Its trigger is inactive until it appears: log it with self.log({key!r}, value) or "
            f"set {name if name != 'kl_divergence' else 'kl'}_key to the name you log."
        )
        if self.strict:
            raise MissingMetricError(message)
        self._warned_keys.add(key)
        log.warning(message + " (strict=True turns this into an error)")

    def _agree(self, trainer: pl.Trainer, metrics: dict[str, float]) -> dict[str, float]:
        """Make every rank judge the same numbers: the worst value over ranks, per signal.

        One packed all-reduce (max) per step instead of one collective per metric; rank-local
        decisions hang or silently diverge DDP replicas (research note §3.3).
        """
        if trainer.world_size <= 1:
            return metrics
        packed: list[float] = []
        names = [LOSS, REWARD, KL, GRAD_NORM]
        for name in names:
            value = metrics.get(name)
            finite = value is not None and math.isfinite(value)
            non_finite = 1.0 if value is not None and not finite else 0.0
            if not finite:
                number = _MISSING
            else:
                assert value is not None
                number = -value if name == REWARD else value  # worst reward = lowest
            packed += [non_finite, number]
        device = trainer.strategy.root_device
        tensor = torch.tensor(packed, dtype=torch.float64, device=device)
        reduced = trainer.strategy.reduce(tensor, reduce_op="max").tolist()
        agreed: dict[str, float] = {}
        for index, name in enumerate(names):
            non_finite, number = reduced[2 * index], reduced[2 * index + 1]
            if non_finite > 0:
                agreed[name] = math.nan
            elif number != _MISSING:
                agreed[name] = -number if name == REWARD else number
        for name, value in metrics.items():
            agreed.setdefault(name, value)
        return agreed

    # ------------------------------------------------------------------ saving
    def _save(self, trainer: pl.Trainer, step: int, metrics: Mapping[str, float]) -> None:
        started = time.perf_counter()
        # The entry goes into the ledger before the dump, so the file's own callback state lists
        # it (research note §7.5: otherwise a resumed run never retires that file).
        record = self.guard.record_save(step, metrics)
        self._next_save = next_save_step(step, self.save_every_n_steps)
        # `dump_checkpoint` is the dict `trainer.save_checkpoint` writes. It is private API (pinned
        # by lightning<2.7 in pyproject), used because the only public route, save_checkpoint,
        # serialises synchronously on the training thread; test_rollback_resume guards it.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        keep = self._snapshot.payload if self._snapshot is not None else None
        staged, release = self._staging.stage(checkpoint, keep=keep)
        blocking = time.perf_counter() - started
        if self.keep_in_memory:
            self._snapshot = Snapshot(step, staged)
        if not self._is_zero:
            release()
            return
        if self._writer is not None:
            self._writer.submit(step, staged, metrics, record.status, blocking, on_done=release)
            return
        write_started = time.perf_counter()
        try:
            committed = self.store.commit(step, staged, metrics, record.status)
        except Exception as err:
            self._on_write_error(step, err)
        else:
            self.observers.on_checkpoint_saved(
                step, committed.bytes, blocking, time.perf_counter() - write_started
            )
        finally:
            release()

    def _report_write_errors(self) -> None:
        if self._writer is None:
            return
        for error in self._writer.take_errors():
            self._on_write_error(error.step, error)

    def _on_write_error(self, step: int, error: BaseException) -> None:
        # The in-memory snapshot of that step stays a valid target; the file does not exist.
        if self._snapshot is None or self._snapshot.step != step:
            self.guard.forget({step})
        self.observers.on_checkpoint_error(step, error)

    def _store_status(self, step: int, status: CheckpointStatus) -> None:
        if not self._is_zero or self._store is None:
            return
        store = self._store

        def update() -> None:
            store.set_status(step, status)

        if self._writer is not None:
            self._writer.run_later(step, update)
        else:
            update()

    def _store_event(self, event: Mapping[str, Any]) -> None:
        if not self._is_zero or self._store is None:
            return
        store = self._store

        def add() -> None:
            store.add_event(event)

        if self._writer is not None:
            self._writer.run_later(int(event["at_step"]), add)
        else:
            add()

    # ------------------------------------------------------------------ rollback
    def _on_trigger(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, obs: Observation
    ) -> None:
        trigger = obs.trigger
        assert trigger is not None
        if self.dry_run:
            event = self.guard.record_dry_run(step, obs.target, trigger)
            self._store_event(event)
            if self._is_zero:
                would = f"step={obs.target.step}" if obs.target else "nothing (no checkpoint yet)"
                log.warning(
                    "Rollback triggered (dry run, nothing restored): %s; a rollback would restore "
                    "%s. Training continues unchanged.",
                    trigger.message,
                    would,
                )
            return
        if self._is_zero:
            log.warning("Rollback triggered: %s", trigger.message)
        if obs.target is None:
            if self._is_zero and not self._warned_no_target:
                self._warned_no_target = True
                log.warning(
                    "No checkpoint to roll back to yet (first save at step %d); training continues "
                    "from the current state.",
                    self._next_save,
                )
            return
        try:
            self.guard.check_budget(step, trigger)
        except RollbackBudgetExceeded as err:  # the fit stops; the history says why
            self._store_event(
                {
                    "type": "budget_exceeded",
                    "at_step": step,
                    "reason": trigger.reason.value,
                    "message": str(err),
                    "time": time.time(),
                }
            )
            self.flush()
            raise
        candidates = self.guard.candidates(step)
        from_memory = self._snapshot is not None and self._snapshot.step == candidates[0].step
        if not from_memory:
            # Loading waits for pending writes; under DDP rank 0 flushes, then all read the file.
            self.flush()
            self._report_write_errors()
            if trainer.world_size > 1:
                trainer.strategy.barrier("rollback_checkpoint_flush")
            if not self._is_zero:
                self.store.refresh()
        source = find_restore_source(candidates, self._snapshot, self.store, self._on_corrupt)
        with self.store.protect(source.record.step):
            self._restore(trainer, pl_module, source.payload, source.from_memory)
        remedies = self._apply_remedies(trainer, step)
        event = self.guard.record_rollback(
            step, source.record, trigger, from_memory=source.from_memory, **remedies
        )
        for entry in self.guard.ledger:
            if entry.status == CheckpointStatus.REJECTED.value:
                self._store_status(entry.step, CheckpointStatus.REJECTED)
        self._store_event(event)
        self.observers.on_rollback(step, source.record.step, trigger.reason.value)
        if self._is_zero:
            log.warning(format_rolled_back(source.record))

    def _on_corrupt(self, record: CheckpointRecord, error: CheckpointCorruptError) -> None:
        if self._is_zero:
            log.error("%s; falling back to the next older checkpoint.", error)
        self.guard.set_status(record.step, CheckpointStatus.CORRUPT)
        self.observers.on_checkpoint_error(record.step, error)

    def _restore(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        payload: Mapping[str, Any],
        from_memory: bool,
    ) -> None:
        """Restore in place with public Strategy methods (weights, optimizers, schedulers,
        precision plugin), plus RNG; then clear gradients."""
        if from_memory:
            # The snapshot must stay intact for later rollbacks: the small parts are deep-copied;
            # weights are copied by Module.load_state_dict, and optimizer states are copied into
            # the live tensors (or deep-copied, see below).
            large = ("state_dict", "current_model_state", "optimizer_states")
            checkpoint = {k: v if k in large else copy.deepcopy(v) for k, v in payload.items()}
        else:
            checkpoint = dict(payload)
        if "current_model_state" in checkpoint:
            # WeightAveraging swaps the averaged weights into "state_dict" (research note §1.2).
            checkpoint["state_dict"] = checkpoint["current_model_state"]
        strategy = trainer.strategy
        pl_module.on_load_checkpoint(checkpoint)  # the module's RL state (KL coef, normalisers)
        strategy.load_model_state_dict(checkpoint, strict=pl_module.strict_loading)
        if strategy.lightning_restore_optimizer and "optimizer_states" in checkpoint:
            states = checkpoint["optimizer_states"]
            in_place = (
                from_memory
                and isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))
                and len(states) == len(trainer.optimizers)
                and all(
                    copy_optimizer_state_(optimizer, state)
                    for optimizer, state in zip(trainer.optimizers, states, strict=True)
                )
            )
            if not in_place:
                if from_memory:
                    # Optimizer.load_state_dict keeps same-device tensors by reference: the
                    # next step would mutate the snapshot (research note §6.1).
                    checkpoint["optimizer_states"] = copy.deepcopy(states)
                strategy.load_optimizer_state_dict(checkpoint)
        if self.restore_scheduler:
            states = checkpoint.get("lr_schedulers", [])
            for config, state in zip(trainer.lr_scheduler_configs, states, strict=False):
                config.scheduler.load_state_dict(state)
        plugin = trainer.precision_plugin
        plugin_key = type(plugin).__qualname__
        if self.restore_precision and plugin_key in checkpoint:
            plugin.load_state_dict(checkpoint[plugin_key])
        rng = checkpoint.get(RNG_KEY)
        # A snapshot holds this rank's own RNG; a file holds rank 0's, so only rank 0 takes it.
        if rng is not None and (from_memory or self._is_zero):
            restore_rng_state(rng)
        for optimizer in trainer.optimizers:
            optimizer.zero_grad(set_to_none=True)
        pl_module.zero_grad(set_to_none=True)

    def _apply_remedies(self, trainer: pl.Trainer, step: int) -> dict[str, Any]:
        applied: dict[str, Any] = {}
        if self.lr_factor != 1.0:
            _scale_learning_rates(trainer.optimizers, trainer.lr_scheduler_configs, self.lr_factor)
            applied["lr_factor"] = self.lr_factor
        if self.reseed:
            seed = step * 1_000_003 + self.guard.rollback_count * 7919 + trainer.global_rank
            reseed(seed)
            applied["reseed"] = seed % (2**32)
        if self.skip_batches:
            self._skip_remaining = self.skip_batches
            applied["skip_batches"] = self.skip_batches
        return applied

    # ------------------------------------------------------------------ persistence
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RNG_KEY] = collect_rng_state()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        rng = checkpoint.get(RNG_KEY)
        if rng is not None and trainer.is_global_zero:
            restore_rng_state(rng)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "guard": self.guard.state_dict(),
            "next_save_step": self._next_save,
            "last_step": self._last_step,
            "skip_remaining": self._skip_remaining,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.guard.load_state_dict(state_dict.get("guard", {}))
        self._next_save = int(state_dict.get("next_save_step", self.save_every_n_steps))
        self._last_step = int(state_dict.get("last_step", -1))
        self._skip_remaining = int(state_dict.get("skip_remaining", 0))


def _worst(first: Mapping[str, float], second: Mapping[str, float]) -> dict[str, float]:
    """Per signal, the worse of two readings (higher loss, KL and grad norm, lower reward; a
    non-finite value wins)."""
    merged = dict(first)
    for name, value in second.items():
        if name not in merged or not math.isfinite(value):
            merged[name] = value
        elif math.isfinite(merged[name]):
            pick = min if name == REWARD else max
            merged[name] = pick(merged[name], value)
    return merged


def _scale_learning_rates(
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
