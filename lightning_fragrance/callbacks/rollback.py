"""`RollbackCheckpoint`: periodic checkpoints and in-place rollback on divergence, for Lightning.

A thin adapter over `lightning_fragrance.checkpointing.RollbackOrchestrator` (the one
save -> judge -> roll back -> record sequence): this module turns the Trainer's hooks into
readings dated by the step that produced them (`evidence`), agrees on them across ranks, lends
the Trainer's state (`trainer_state`), and keeps Lightning's own expectations: the files are
standard checkpoints, ``ckpt_path="best"`` works after the fit, ``fast_dev_run`` writes nothing.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override

from lightning_fragrance.callbacks.evidence import LoggedEvidence
from lightning_fragrance.callbacks.sharded_state import (
    ShardedTrainerState,
    sharded_model_key,
    verify_before_load,
)
from lightning_fragrance.callbacks.trainer_state import (
    RNG_KEY,
    TrainerState,
    default_dirpath,
    scale_learning_rates,
)
from lightning_fragrance.checkpointing import (
    CheckpointDirectoryError,
    CheckpointObserver,
    CheckpointRecord,
    CheckpointStore,
    LoggingObserver,
    MissingMetricError,
    ObserverGroup,
    Reading,
    RollbackConditions,
    RollbackGuard,
    RollbackOrchestrator,
    agreement,
    collect_rng_state,
    reseed,
    restore_rng_state,
    shared_view,
)
from lightning_fragrance.checkpointing.errors import CheckpointError
from lightning_fragrance.checkpointing.sharded import ShardedCheckpointer
from lightning_fragrance.checkpointing.triggers import GRAD_NORM, KL, LOSS, REWARD

__all__ = ["RNG_KEY", "RollbackCheckpoint"]

log = logging.getLogger("lightning_fragrance.callbacks.rollback")

STATE_VERSION = 2
"""Version of the callback state in checkpoints (2: run id, freshness, known-good targets)."""
_NAME = "RollbackCheckpoint"


class RollbackCheckpoint(Checkpoint):
    r"""Checkpoint every N optimizer steps; when training diverges, roll back in place and go on.

    A *step* is an optimizer step: ``trainer.global_step``. With gradient accumulation several
    batches make one step; with manual optimization (PPO) one batch can make several. A save
    happens at the first step at or past each multiple of ``save_every_n_steps`` (never on a
    step whose newest evidence is bad, never with non-finite weights). ``global_step`` keeps
    counting through rollbacks: they are events, not rewinds of the loops.

    Every value is judged once, when it is fresh: the guard knows the step at which each watched
    value was produced (returned by ``training_step``, ``self.log`` on_step, an ``on_epoch``
    aggregate at the epoch's end, a validation metric), so metrics logged once per rollout or
    per epoch are first-class, and a rollback is never re-triggered by the stale value that
    caused it. A checkpoint becomes a rollback target only once every watched signal produced
    a healthy value after it (``certify=True``, the default); the state the fit starts from is
    the target of last resort. ``certify=False`` is the operations guide's literal behaviour.

    The files are standard Lightning checkpoints (``Trainer.fit(ckpt_path=...)`` resumes them,
    with this callback's history, counters and budget) that load with
    ``torch.load(weights_only=True)``; ``checkpoint_history.json`` beside them is the commit
    record and names the run (``run_id``) that wrote them. Under a sharding strategy
    (``ModelParallelStrategy``/FSDP2, ``FSDPStrategy``) every rank saves and restores its own
    shard with ``torch.distributed.checkpoint`` instead: a checkpoint is a directory
    (`lightning_fragrance.checkpointing.sharded`, docs/checkpointing.md).

    Args:
        dirpath: Directory or fsspec URL of the checkpoints. None (default): one per run, under
            the Trainer's log directory (``trainer.log_dir/checkpoints`` for TensorBoard/CSV
            loggers, else ``<log_dir or default_root_dir>/checkpoints/version_N``); a resumed
            fit continues in the directory of the checkpoint it resumes from.
        save_every_n_steps: Save at the first step at or past each multiple of this.
        max_checkpoints: Unpinned checkpoints kept; older ones are deleted after a newer commit.
        kl_threshold: Roll back when KL > this (absolute). See `RollbackConditions`.
        loss_increase_multiplier: Roll back when ``|loss| > multiplier x |baseline loss|``.
        reward_drop_threshold: Roll back when reward fell by more than this fraction.
        baseline: ``"checkpoint"`` (the guide: metrics of the rollback target) or
            ``"window_median"`` (median of the last ``window`` healthy readings).
        window: Healthy readings in the median window (also its warm-up).
        patience: Consecutive bad readings before acting (non-finite values act at once).
        min_baseline_magnitude: Floor of ``|baseline|`` for the ratio triggers.
        grad_norm_threshold: Optional multiple of the baseline gradient norm that triggers. When
            ``grad_norm_key`` is not logged, the callback measures the norm itself (pre-clip).
        certify: Known-good targets (see above). False: every checkpoint is a target at once,
            the newest first (the guide's "roll back to the latest checkpoint").
        certify_after_steps: With ``certify``, also wait this many steps after a checkpoint.
        max_rollbacks: Restores (escalations included) allowed within
            ``rollback_budget_window`` steps; one more raises `RollbackBudgetExceeded` naming
            the last known-good checkpoint, and the fit stops. None = unlimited.
        rollback_budget_window: Width of the budget window in steps.
        loss_key: Metric read for the loss: the dict returned by ``training_step``, else what
            ``self.log`` recorded (on_step, on_epoch or in validation).
        reward_key: Same, for the reward.
        kl_key: Same, for the KL divergence.
        grad_norm_key: Same, for the gradient norm (only read when ``grad_norm_threshold``).
        dry_run: Judge and record triggers but never restore: calibrate thresholds on a healthy
            run, then switch it off.
        strict: Raise `MissingMetricError` when a key is never produced instead of warning.
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
        overwrite: A ``dirpath`` holding another run's checkpoints is refused (histories would
            merge, same-numbered files be overwritten, retention delete this run's files);
            True starts a new history there instead, the old one kept beside it (its files are
            no longer checkpoints of the directory; a file of the same step is replaced).
        observers: Told about saves, rollbacks and errors, besides the logging observer that is
            always attached.
        fs: Optional fsspec filesystem; ``dirpath`` is then a path on it.
        host_memory_budget: Host bytes the guard may hold in copies of the training state
            (staged saves, the in-memory snapshot), per rank; None = one copy. Below one copy,
            saves are written synchronously and rollbacks read the file (a warning with the
            numbers says so). ``float("inf")`` restores the full pipeline (three copies).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
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
        certify: bool = True,
        certify_after_steps: int = 0,
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
        overwrite: bool = False,
        observers: Iterable[CheckpointObserver] | None = None,
        fs: fsspec.AbstractFileSystem | None = None,
        host_memory_budget: float | None = None,
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
            certify=certify,
            certify_after_steps=certify_after_steps,
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
        self.overwrite = overwrite
        # The logging observer is always there: a write error is never silent, whatever else
        # (Prometheus) is attached.
        self.observers = ObserverGroup([LoggingObserver(), *(observers or ())])
        self._fs = fs
        self.host_memory_budget = host_memory_budget
        self.engine: RollbackOrchestrator | None = None
        self.evidence = LoggedEvidence(self.keys)
        self._loaded: Mapping[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self._last_step = -1
        self._epoch_start = 0
        self._skip_remaining = 0
        self._accumulated: dict[str, Reading] = {}
        self._grad_norm_sq: float | None = None
        self._reported_cadence = False
        self._sharded_key: str | None = None

    # ------------------------------------------------------------------ Lightning identity
    @property
    @override
    def state_key(self) -> str:
        # Two guards (other directories, other keys) keep their own state in one checkpoint.
        return self._generate_state_key(
            dirpath=self.dirpath, every=self.save_every_n_steps, keys=sorted(self.keys.values())
        )

    @property
    def best_model_path(self) -> str:
        """What ``ckpt_path="best"`` loads: a user's ``ModelCheckpoint``'s best, whatever the
        callback order, else this guard's newest known-good checkpoint ("" when none)."""
        trainer = self._trainer
        if trainer is not None:
            for callback in trainer.checkpoint_callbacks:
                if callback is not self and not isinstance(callback, RollbackCheckpoint):
                    path = getattr(callback, "best_model_path", None)
                    if isinstance(path, str):
                        return path
        if self.engine is None:
            return ""
        self.engine.flush()
        committed = {r.step: r for r in self.engine.store.records()}
        good = [r for r in self.engine.guard.candidates(sys.maxsize) if r.step in committed]
        return self.engine.store.url(good[0].file) if good else ""

    # ------------------------------------------------------------------ public properties
    @property
    def store(self) -> CheckpointStore:
        """The checkpoint store (available once the fit has started)."""
        if self.engine is None:
            raise RuntimeError("RollbackCheckpoint.store is available after Trainer.fit starts")
        return self.engine.store

    @property
    def guard(self) -> RollbackGuard:
        """The `RollbackGuard` holding the ledger and the decisions (after the fit started)."""
        if self.engine is None:
            raise RuntimeError("RollbackCheckpoint.guard is available after Trainer.fit starts")
        return self.engine.guard

    @property
    def history(self) -> list[CheckpointRecord]:
        """Committed checkpoints, oldest first (waits for pending writes)."""
        self.flush()
        return self.store.records()

    @property
    def rollback_count(self) -> int:
        """Restores performed (dry-run triggers excluded)."""
        return self.engine.guard.rollback_count if self.engine is not None else 0

    @property
    def rollback_events(self) -> list[dict[str, Any]]:
        """Performed rollbacks: ``{"at_step", "to_step", "reason", "message", ...}``."""
        return self.engine.guard.rollback_events if self.engine is not None else []

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every recorded event, dry-run triggers included."""
        return [dict(e) for e in self.engine.guard.events] if self.engine is not None else []

    def flush(self) -> None:
        """Wait until every pending checkpoint write is durable (rank 0)."""
        if self.engine is not None:
            self.engine.flush()

    # ------------------------------------------------------------------ set-up / tear-down
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit" or _fast_dev_run(trainer):
            return
        self._sharded_key = sharded_model_key(trainer.strategy, _NAME)
        if self._sharded_key is not None:  # DCP's .metadata is a pickle: hashes first
            verify_before_load(trainer.strategy, _NAME)
        if self.dirpath is None:
            return
        if trainer.is_global_zero:  # fail now, not at the first save
            self._check_writable(self.dirpath)

    def _check_writable(self, dirpath: str) -> None:
        probe = CheckpointStore(dirpath, self.max_checkpoints, fs=self._fs, read_only=True)
        probe.check_writable(_NAME)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _fast_dev_run(trainer) or self._starts_late(trainer):
            return
        self._start_engine(trainer)

    def _starts_late(self, trainer: pl.Trainer) -> bool:
        """Sharding strategies restore a resumed checkpoint (this callback's state, the step)
        only after ``on_fit_start``: the engine then starts in ``on_train_start``."""
        return self._sharded_key is not None and trainer.strategy.restore_checkpoint_after_setup

    def _start_engine(self, trainer: pl.Trainer) -> None:
        # After Lightning restored a resumed checkpoint (and this callback's state with it).
        loaded = self._loaded or {}
        run_id = str(loaded.get("guard", {}).get("run_id", "")) or uuid.uuid4().hex[:12]
        run_id = trainer.strategy.broadcast(run_id, src=0)
        dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer), src=0)
        if trainer.is_global_zero:
            self._check_writable(dirpath)
        store = CheckpointStore(
            dirpath, self.max_checkpoints, fs=self._fs, read_only=not trainer.is_global_zero
        )
        if trainer.is_global_zero:
            try:
                store.claim(run_id, resume=trainer.ckpt_path is not None, overwrite=self.overwrite)
            except CheckpointDirectoryError as err:
                raise CheckpointDirectoryError(f"{_NAME}: {err}") from None
        trainer.strategy.barrier("rollback_checkpoint_claim")
        if trainer.world_size > 1:
            self._check_shared(trainer, store, run_id, dirpath)
        self.engine = RollbackOrchestrator(
            store,
            self.conditions,
            save_every=self.save_every_n_steps,
            observers=self.observers,
            signals=self.keys,
            run_id=run_id,
            is_writer=trainer.is_global_zero,
            async_save=self.async_save,
            keep_in_memory=self.keep_in_memory,
            dry_run=self.dry_run,
            barrier=lambda: trainer.strategy.barrier("rollback_checkpoint_flush"),
            host_memory_budget=self.host_memory_budget,
            sharded=ShardedCheckpointer(store) if self._sharded_key is not None else None,
        )
        if loaded:
            self.engine.load_state_dict(loaded)
            self._reconcile(trainer.global_step)
        self.engine.guard.run_id = run_id

    def _check_shared(
        self, trainer: pl.Trainer, store: CheckpointStore, run_id: str, dirpath: str
    ) -> None:
        """Every rank must read the directory rank 0 writes (`checkpointing.shared_view`); the
        answers are gathered, so all ranks raise together instead of hanging in a rollback."""
        sees = trainer.is_global_zero or shared_view.sees_run(store, run_id)
        vector = shared_view.blindness(trainer.global_rank, trainer.world_size, sees)
        mine = torch.tensor(vector, dtype=torch.float64, device=trainer.strategy.root_device)
        blind = shared_view.blind_ranks(trainer.strategy.reduce(mine, reduce_op="max").tolist())
        if blind:
            message = shared_view.not_shared_message(_NAME, dirpath, blind, trainer.world_size)
            raise CheckpointDirectoryError(message)

    def _resolve_dirpath(self, trainer: pl.Trainer) -> str:
        return self.dirpath if self.dirpath is not None else default_dirpath(trainer)

    def _reconcile(self, step: int) -> None:
        """After a resume: forget entries whose files are gone; entries newer than the resumed
        step belong to the abandoned future of that run, not to this lineage."""
        assert self.engine is not None
        guard, committed = self.engine.guard, {r.step: r for r in self.engine.store.records()}
        guard.forget({e.step for e in guard.ledger if e.step not in committed})
        for entry in guard.ledger:
            stored = committed[entry.step]
            if not stored.is_rollback_target:
                entry.status, entry.note = stored.status, stored.note
        for stored in committed.values():
            if stored.step > step and stored.is_rollback_target and self.engine.is_writer:
                note = f"not in this lineage: the run resumed from step {step}"
                self.engine.store.set_status(stored.step, "rejected", note=note)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is None and not _fast_dev_run(trainer) and self._starts_late(trainer):
            self._start_engine(trainer)
        if self.engine is not None:
            self._last_step = trainer.global_step
            self.engine.start(trainer.global_step, self._provider(trainer, pl_module))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.engine is not None:
            self.engine.close()
            self.engine.snapshot = None  # the store stays readable: `history` after the fit

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.engine is not None:  # keep what was already staged, then stop the thread
            self.engine.close()

    def _provider(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TrainerState:
        if self._sharded_key is not None:
            return ShardedTrainerState(
                trainer,
                pl_module,
                self._sharded_key,
                self.restore_scheduler,
                self.restore_precision,
            )
        return TrainerState(trainer, pl_module, self.restore_scheduler, self.restore_precision)

    # ------------------------------------------------------------------ per step
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = trainer.global_step

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.engine is not None:
            self.evidence.before_batch(trainer)

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
        if self.engine is None:
            return
        step = trainer.global_step
        readings = self.evidence.step_readings(trainer, outputs)
        if GRAD_NORM in self.keys and GRAD_NORM not in readings and self._grad_norm_sq:
            readings[GRAD_NORM] = Reading(math.sqrt(self._grad_norm_sq), step)
        self._grad_norm_sq = None
        if step == self._last_step:
            # No update on this batch: its values were computed from the current state itself.
            readings = {
                n: r if r.since is not None else Reading(r.value, r.produced_at, r.produced_at)
                for n, r in readings.items()
            }
        readings = agreement.merge_worst(self._accumulated, readings)
        if step == self._last_step:
            # Gradient accumulation: no optimizer step on this batch. Keep the worst values so
            # a divergence in any micro-batch of the step is judged once the step happens.
            self._accumulated = readings
            return
        self._accumulated = {}
        self._last_step = step
        if self._skip_remaining > 0:
            self._skip_remaining -= 1
        provider = self._provider(trainer, pl_module)
        agreed = self._agree(trainer, readings)
        self._judge_and_act(trainer, provider, agreed, save=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is None:
            return
        readings = self.evidence.epoch_readings(trainer, self._epoch_start)
        agreed = self._agree(trainer, readings)
        if agreed:
            self._judge_and_act(trainer, self._provider(trainer, pl_module), agreed, save=False)
        if not self._reported_cadence:
            self._reported_cadence = True
            self._report_cadence(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        agreed = self._agree(trainer, self.evidence.validation_readings(trainer))
        if agreed:
            self._judge_and_act(trainer, self._provider(trainer, pl_module), agreed, save=False)

    def _judge_and_act(
        self,
        trainer: pl.Trainer,
        provider: TrainerState,
        readings: Mapping[str, Reading],
        save: bool,
    ) -> None:
        assert self.engine is not None
        step = trainer.global_step

        def remedies() -> dict[str, Any]:
            return self._remedies(trainer, step)

        if save:
            self.engine.step(step, readings, provider, remedies)
            return
        observation = self.engine.judge(step, readings)
        if observation.fire and observation.trigger is not None:
            self.engine.act(step, observation.trigger, provider, remedies)

    def _report_cadence(self, trainer: pl.Trainer) -> None:
        """After the first epoch: how each key arrives, and the keys that never do."""
        assert self.engine is not None
        for signal, key in self.keys.items():
            if signal in self.evidence.sources:
                if trainer.is_global_zero:
                    log.info(
                        "%s: %r (%s) is %s; a checkpoint becomes a rollback target once its "
                        "first value after the checkpoint is in.",
                        _NAME,
                        key,
                        signal,
                        self.evidence.cadence(signal),
                    )
                continue
            self.engine.guard.drop_signal(signal)
            message = (
                f"{_NAME}: metric {key!r} ({signal}) was not produced during the first epoch: "
                f"neither returned by training_step nor logged with self.log (on_step, "
                f"on_epoch or in validation); logged keys: {sorted(trainer.callback_metrics)}. "
                f"Its trigger is inactive until it appears: log it with self.log({key!r}, "
                f"value) or set {'kl' if signal == KL else signal}_key to the name you log."
            )
            if self.strict:
                raise MissingMetricError(message)
            log.warning(message + " (strict=True turns this into an error)")

    def _agree(self, trainer: pl.Trainer, readings: dict[str, Reading]) -> dict[str, Reading]:
        """Make every rank judge the same readings: one packed all-reduce (max) per call
        (`lightning_fragrance.checkpointing.agreement`)."""
        if trainer.world_size <= 1:
            return readings
        names = list(self.keys)
        device = trainer.strategy.root_device
        tensor = torch.tensor(agreement.pack(names, readings), dtype=torch.float64, device=device)
        return agreement.unpack(names, trainer.strategy.reduce(tensor, reduce_op="max").tolist())

    # ------------------------------------------------------------------ remedies
    def _remedies(self, trainer: pl.Trainer, step: int) -> dict[str, Any]:
        applied: dict[str, Any] = {}
        if self.lr_factor != 1.0:
            scale_learning_rates(trainer.optimizers, trainer.lr_scheduler_configs, self.lr_factor)
            applied["lr_factor"] = self.lr_factor
        if self.reseed:
            seed = step * 1_000_003 + self.rollback_count * 7919 + trainer.global_rank
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
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "last_step": self._last_step,
            "skip_remaining": self._skip_remaining,
        }
        if self.engine is not None:
            state.update(self.engine.state_dict())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = int(state_dict.get("version", 1))
        if version > STATE_VERSION:
            raise CheckpointError(
                f"{_NAME} state version {version} in this checkpoint is newer than this "
                f"lightning_fragrance understands ({STATE_VERSION}): upgrade the package."
            )
        self._loaded = dict(state_dict)
        self._last_step = int(state_dict.get("last_step", -1))
        self._skip_remaining = int(state_dict.get("skip_remaining", 0))


def _fast_dev_run(trainer: pl.Trainer) -> bool:
    # Set by the Trainer's debugging connector; typed stubs do not list it.
    return bool(getattr(trainer, "fast_dev_run", False))
