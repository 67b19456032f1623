"""Staging a checkpoint off the training thread, and the one ordered background writer.

The training thread pays only for `stage_to_cpu` (a real copy: optimizer tensors keep changing
in place, research note §6.1 and Lightning PR #21079). Everything slow, in order, happens on one
thread: write (hashed) → fsync → rename → history → retention. Ordering on one worker is what
Lightning's `AsyncCheckpointIO` lacks (load-after-save `FileNotFoundError`, leaked files under
`save_top_k`, late errors: research note §1.4).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from lightning_fragrance.checkpointing.errors import CheckpointError
from lightning_fragrance.checkpointing.observers import CheckpointObserver, ObserverGroup
from lightning_fragrance.checkpointing.records import CheckpointRecord, CheckpointStatus
from lightning_fragrance.checkpointing.store import CheckpointStore

log = logging.getLogger("lightning_fragrance.checkpointing")


def stage_to_cpu(obj: Any, into: Any = None) -> Any:
    """Deep copy of nested dicts/lists/tuples with every tensor copied to CPU memory.

    The result never shares storage with ``obj``: later in-place updates of parameters or
    optimizer moments cannot reach it. CUDA tensors go through pinned buffers with
    non-blocking copies and one synchronisation at the end.

    Args:
        obj: The state to copy (e.g. a Lightning checkpoint dict).
        into: An earlier result of this function that nobody uses any more: its tensors are
            reused where shape and dtype match (no allocation, no page faults), the rest is
            allocated. See `StagingPool`.
    """
    has_cuda = [False]
    staged = _stage(obj, has_cuda, into)
    if has_cuda[0]:
        torch.cuda.synchronize()
    return staged


def _stage(obj: Any, has_cuda: list[bool], into: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        reusable = (
            isinstance(into, torch.Tensor)
            and into.shape == tensor.shape
            and into.dtype == tensor.dtype
            and into.device.type == "cpu"
            and (into.is_pinned() or not tensor.is_cuda)
        )
        if tensor.is_cuda:
            has_cuda[0] = True
            if not reusable:
                into = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            return into.copy_(tensor, non_blocking=True)
        if reusable:
            return into.copy_(tensor)
        return tensor.to("cpu", copy=True)
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        items = ((k, _stage(v, has_cuda, old.get(k))) for k, v in obj.items())
        return (
            collections.OrderedDict(items)
            if isinstance(obj, collections.OrderedDict)
            else dict(items)
        )
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        old_seq = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else None
        values = [_stage(v, has_cuda, old_seq[i] if old_seq else None) for i, v in enumerate(obj)]
        return values if isinstance(obj, list) else tuple(values)
    return obj  # numbers, strings, None: immutable


@dataclasses.dataclass
class _StagedSet:
    payload: Any
    released: threading.Event


class StagingPool:
    """Recycles the CPU buffers of staged checkpoints.

    A fresh multi-hundred-MB allocation per save costs more in first-touch page faults than the
    copy itself (537 MB: 0.38-0.44 s fresh vs 0.08-0.09 s into reused buffers, measured in
    docs/checkpointing-benchmarks.md). A set of buffers is reused once its write is done
    (``release`` called) and it is not the in-memory snapshot (``keep``). Three sets cover the
    worst case: the snapshot, one being written and one queued.

    Args:
        max_sets: Released sets kept for reuse beyond which the oldest are dropped.
    """

    def __init__(self, max_sets: int = 3) -> None:
        self.max_sets = max_sets
        self._sets: list[_StagedSet] = []
        self._lock = threading.Lock()

    def stage(self, obj: Any, keep: Any = None) -> tuple[Any, Callable[[], None]]:
        """Stage ``obj``; returns the copy and the function to call once it may be reused."""
        with self._lock:
            free = next(
                (s for s in self._sets if s.released.is_set() and s.payload is not keep), None
            )
            if free is not None:
                self._sets.remove(free)
        staged = stage_to_cpu(obj, into=free.payload if free is not None else None)
        entry = _StagedSet(staged, threading.Event())
        with self._lock:
            self._sets.append(entry)
            spare = [s for s in self._sets if s.released.is_set() and s.payload is not keep]
            for old in spare[: max(0, len(self._sets) - self.max_sets)]:
                self._sets.remove(old)
        return staged, entry.released.set


class CheckpointWriteError(CheckpointError):
    """A background write failed; raised nowhere, handed out by `take_errors`.

    Attributes:
        step: The step whose checkpoint (or history update) was not written.
        is_commit: True when the checkpoint itself was not committed; False for a history
            update (a status change, an event), whose checkpoint stays valid.
    """

    def __init__(self, step: int, cause: BaseException, is_commit: bool = True) -> None:
        what = "the checkpoint" if is_commit else "a history update for the checkpoint"
        super().__init__(f"Writing {what} of step {step} failed: {type(cause).__name__}: {cause}")
        self.step = step
        self.is_commit = is_commit
        self.__cause__ = cause


@dataclasses.dataclass
class _Job:
    step: int
    action: Callable[[], CheckpointRecord | None]
    staged: bool
    blocking_seconds: float = 0.0
    on_done: Callable[[], None] | None = None


class AsyncCheckpointWriter:
    """One background thread that commits staged checkpoints to a `CheckpointStore` in order.

    At most one staged checkpoint waits in the queue besides the one being written: `submit`
    blocks when another is already waiting (back-pressure bounds host memory to two staged
    copies). Small history updates (`run_later`) share the same ordered queue.

    Args:
        store: Where to commit.
        observers: Told about each commit (from the writer thread).
    """

    def __init__(
        self, store: CheckpointStore, observers: Iterable[CheckpointObserver] = ()
    ) -> None:
        self.store = store
        self.observers = ObserverGroup(observers)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._staged_slot = threading.Semaphore(1)
        self._errors: list[CheckpointWriteError] = []
        self._errors_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lf-checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(
        self,
        step: int,
        staged_payload: Mapping[str, Any],
        metrics: Mapping[str, float],
        status: str | CheckpointStatus = CheckpointStatus.PENDING,
        blocking_seconds: float = 0.0,
        on_done: Callable[[], None] | None = None,
        run_id: str = "",
        initial: bool = False,
    ) -> None:
        """Queue ``staged_payload`` (from `stage_to_cpu`; never mutate it afterwards).

        Args:
            step: Its step.
            staged_payload: The CPU copy to write.
            metrics: Metrics recorded in the history entry.
            status: Initial status of the entry.
            blocking_seconds: Staging time already spent by the caller (reported to observers).
            on_done: Called on the writer thread once the payload is no longer read (after the
                commit, or its failure), e.g. `StagingPool`'s release.
            run_id: The run recorded in the history entry.
            initial: Whether it is the run's initial state.
        """
        self._check_open()
        metrics = dict(metrics)
        self._staged_slot.acquire()  # back-pressure: at most one staged checkpoint waiting

        def commit() -> CheckpointRecord:
            return self.store.commit(
                step, staged_payload, metrics, status, run_id=run_id, initial=initial
            )

        self._queue.put(
            _Job(step, commit, staged=True, blocking_seconds=blocking_seconds, on_done=on_done)
        )

    def run_later(self, step: int, action: Callable[[], None]) -> None:
        """Run a small store update (status change, event) after every job queued before it."""
        self._check_open()

        def wrapped() -> None:
            action()

        self._queue.put(_Job(step, wrapped, staged=False))

    def flush(self) -> None:
        """Block until every queued job has finished (loading calls this first)."""
        self._queue.join()

    def take_errors(self) -> list[CheckpointWriteError]:
        """Errors of finished jobs since the last call (each is returned once)."""
        with self._errors_lock:
            errors, self._errors = self._errors, []
        return errors

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._queue.unfinished_tasks

    def close(self) -> None:
        """Finish pending jobs and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("AsyncCheckpointWriter is closed")

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if job.staged:
                    self._staged_slot.release()
                started = time.perf_counter()
                try:
                    record = job.action()
                except Exception as err:  # surfaced by take_errors at the next step
                    with self._errors_lock:
                        self._errors.append(CheckpointWriteError(job.step, err, job.staged))
                    continue
                if job.staged and record is not None:
                    self.observers.on_checkpoint_saved(
                        record.step,
                        record.bytes,
                        job.blocking_seconds,
                        time.perf_counter() - started,
                    )
            finally:
                if job is not None and job.on_done is not None:
                    job.on_done()
                self._queue.task_done()
