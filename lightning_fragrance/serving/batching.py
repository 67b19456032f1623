"""Dynamic batching of ``generate`` calls: concurrent requests share one forward pass per token.

One ``GenerationBatcher`` belongs to one loaded model (one worker of the brief LLM line), so a
batch never mixes model versions; inside it, a batch holds one mode only, because the modes
decode differently (greedy or sampled, and how many tokens). A request waits at most
``max_wait_s`` for others to join it, and a batch holds at most ``max_batch_size`` requests.

The decision of what to run next (``choose_batch``) is a pure function of the queues and the
clock; the thread that runs batches is the effect around it. The thread exists only while
there is work: it starts on a submission and ends once the queues stay empty for
``idle_exit_s`` (or at once after ``close``), so a retired model is never held by it.
"""

from __future__ import annotations

import inspect
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

from lightning_fragrance.monitoring import BriefMode


class BatcherClosed(RuntimeError):
    """The model behind this batcher was retired; the request goes to the serving one."""


@dataclass(eq=False)
class PendingRequest:
    """One text waiting for its answer."""

    text: str
    mode: BriefMode
    enqueued_at: float
    future: Future[str] = field(default_factory=Future)


class BatchChoice(NamedTuple):
    """What ``choose_batch`` decided: run ``mode`` now, or wait ``wait_s`` and ask again."""

    mode: BriefMode | None
    wait_s: float


def choose_batch(
    queues: Mapping[BriefMode, Sequence[PendingRequest]],
    now: float,
    *,
    max_batch_size: int,
    max_wait_s: float,
) -> BatchChoice:
    """The mode whose batch should run now, else how long to wait for more requests.

    The mode holding the oldest request goes first (no mode starves another). Its batch runs
    once it is full or its oldest request has waited ``max_wait_s``; a full batch of another
    mode runs at once rather than idle behind a partial one.
    """
    waiting = [(q[0].enqueued_at, mode) for mode, q in queues.items() if q]
    if not waiting:
        return BatchChoice(None, float("inf"))
    for _, mode in sorted(waiting, key=lambda item: item[0]):
        if len(queues[mode]) >= max_batch_size:
            return BatchChoice(mode, 0.0)
    oldest_at, oldest_mode = min(waiting, key=lambda item: item[0])
    remaining = oldest_at + max_wait_s - now
    if remaining <= 0:
        return BatchChoice(oldest_mode, 0.0)
    return BatchChoice(None, remaining)


@dataclass
class BatchStats:
    """Batches run and requests answered (``mean_batch_size`` for ``GET /admin/model``)."""

    batches: int = 0
    requests: int = 0

    @property
    def mean_batch_size(self) -> float:
        """Requests per batch so far (0 before the first batch)."""
        return self.requests / self.batches if self.batches else 0.0


class GenerationBatcher:
    """Collect concurrent requests of one model into batched ``run_batch`` calls.

    Args:
        run_batch: ``run_batch(texts, mode)`` returns one answer per text, in order.
        max_batch_size: most requests in one call (default 8).
        max_wait_s: longest a request waits for others before its batch runs (default 0.01).
        idle_exit_s: the thread ends after this long without work (default 5).
        name: the thread's name.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        run_batch: Callable[[list[str], BriefMode], list[str]],
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
        idle_exit_s: float = 5.0,
        name: str = "lf-generate",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0 seconds, got {max_wait_s}")
        # A bound method is held weakly: the model owns its batcher, and a strong reference
        # back would make a cycle that only a full GC pass frees (0.3 s of GIL with transformers
        # loaded, measured in bench_llm_serving inside every reload's stop phase).
        self._run_batch: Callable[[], Callable[[list[str], BriefMode], list[str]] | None] = (
            weakref.WeakMethod(run_batch) if inspect.ismethod(run_batch) else lambda: run_batch
        )
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.idle_exit_s = idle_exit_s
        self.name = name
        self.clock = clock
        self.stats = BatchStats()
        self._queues: dict[BriefMode, deque[PendingRequest]] = {mode: deque() for mode in BriefMode}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, text: str, mode: BriefMode) -> Future[str]:
        """Queue ``text``; the future holds its answer (or the batch's exception).

        Raises:
            BatcherClosed: the model was retired (a request admitted to it never gets here).
        """
        request = PendingRequest(text, BriefMode(mode), self.clock())
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"{self.name} is closed; its model was retired")
            self._queues[request.mode].append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return request.future

    def close(self, wait_s: float = 0.0) -> None:
        """Answer what is queued, then let the thread end (the model is being retired).

        Args:
            wait_s: how long to wait for the thread to end. A process that exits while a
                ``generate`` still runs on it is aborted by the C++ runtime ("terminate called
                without an active exception"), so a shutdown waits for the batch in flight.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and wait_s > 0:
            thread.join(wait_s)

    @property
    def pending(self) -> int:
        """Requests queued and not yet in a batch."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    # Decided under the lock a submission takes: it sees no thread and starts one.
                    self._thread = None
                    return
            self._run(batch)
            del batch  # its futures' callbacks may reach the model: not held while idle

    def _next_batch(self) -> list[PendingRequest] | None:
        idle_since = self.clock()
        while True:
            choice = choose_batch(
                self._queues,
                self.clock(),
                max_batch_size=self.max_batch_size,
                max_wait_s=0.0 if self._closed else self.max_wait_s,
            )
            if choice.mode is not None:
                queue = self._queues[choice.mode]
                return [queue.popleft() for _ in range(min(self.max_batch_size, len(queue)))]
            if choice.wait_s == float("inf"):
                idle = self.clock() - idle_since
                if self._closed or idle >= self.idle_exit_s:
                    return None
                self._cond.wait(self.idle_exit_s - idle)
            else:
                self._cond.wait(choice.wait_s)

    def _run(self, batch: list[PendingRequest]) -> None:
        try:
            run_batch = self._run_batch()
            if run_batch is None:
                raise BatcherClosed(f"{self.name}: its model was freed with requests queued")
            answers = run_batch([r.text for r in batch], batch[0].mode)
            if len(answers) != len(batch):
                raise RuntimeError(f"run_batch gave {len(answers)} answers for {len(batch)} texts")
        except BaseException as exc:  # every waiting request learns what happened
            for request in batch:
                request.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.requests += len(batch)
        for request, answer in zip(batch, answers, strict=True):
            request.future.set_result(answer)
