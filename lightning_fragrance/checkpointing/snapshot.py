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


def stage_to_cpu(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples with every tensor copied to CPU memory.

    The result never shares storage with ``obj``: later in-place updates of parameters or
    optimizer moments cannot reach it. CUDA tensors go through pinned buffers with
    non-blocking copies and one synchronisation at the end.
    """
    has_cuda = [False]
    staged = _stage(obj, has_cuda)
    if has_cuda[0]:
        torch.cuda.synchronize()
    return staged


def _stage(obj: Any, has_cuda: list[bool]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        if tensor.is_cuda:
            has_cuda[0] = True
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            return pinned.copy_(tensor, non_blocking=True)
        return tensor.to("cpu", copy=True)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _stage(v, has_cuda)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _stage(v, has_cuda) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_stage(v, has_cuda) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_stage(v, has_cuda) for v in obj)
    return obj  # numbers, strings, None: immutable


class CheckpointWriteError(CheckpointError):
    """A background write failed; raised nowhere, handed out by `take_errors`.

    Attributes:
        step: The step whose checkpoint was not committed.
    """

    def __init__(self, step: int, cause: BaseException) -> None:
        super().__init__(
            f"Writing the checkpoint of step {step} failed: {type(cause).__name__}: {cause}"
        )
        self.step = step
        self.__cause__ = cause


@dataclasses.dataclass
class _Job:
    step: int
    action: Callable[[], CheckpointRecord | None]
    staged: bool
    blocking_seconds: float = 0.0


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
    ) -> None:
        """Queue ``staged_payload`` (from `stage_to_cpu`; never mutate it afterwards).

        Args:
            step: Its step.
            staged_payload: The CPU copy to write.
            metrics: Metrics recorded in the history entry.
            status: Initial status of the entry.
            blocking_seconds: Staging time already spent by the caller (reported to observers).
        """
        self._check_open()
        metrics = dict(metrics)
        self._staged_slot.acquire()  # back-pressure: at most one staged checkpoint waiting

        def commit() -> CheckpointRecord:
            return self.store.commit(step, staged_payload, metrics, status)

        self._queue.put(_Job(step, commit, staged=True, blocking_seconds=blocking_seconds))

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
                        self._errors.append(CheckpointWriteError(job.step, err))
                    continue
                if job.staged and record is not None:
                    self.observers.on_checkpoint_saved(
                        record.step,
                        record.bytes,
                        job.blocking_seconds,
                        time.perf_counter() - started,
                    )
            finally:
                self._queue.task_done()
