"""Blue/green model reload inside one serving process, without dropping a request.

A reload builds a new worker beside the serving one and walks it through
``LOADING → VALIDATING → WARMING → SWITCHING → DRAINING → STOPPED``. Any failure before the
switch ends in ``FAILED`` and leaves the serving worker untouched (research note §3: the
failure every peer has, from Ray's 503s to vLLM's dead engine). The switch is a reference swap
under a lock; a request keeps the worker it started on until it ends, so the old worker is
drained, not interrupted.

The user owns the model (``model_loader``, ``warmup_func``); the manager owns the lifecycle,
like LitServe's ``setup``/``predict`` contract (STYLE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import inspect
import itertools
import logging
import math
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

import torch

# The phase, outcome and drain-timeout vocabularies are the metric catalogue's own (one source
# of truth for the manager and the labels of model_reload_phase_seconds{phase},
# model_reload_total{result} and model_reload_drain_timeout_requests_total{action}); metrics.py
# is plain enums and imports no prometheus_client.
from lightning_fragrance.labels import DrainTimeoutAction, ReloadPhase, ReloadResult

log = logging.getLogger(__name__)

M = TypeVar("M")
R = TypeVar("R")


class WorkerStatus(str, Enum):
    """Where a worker is in its life."""

    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STANDBY = "standby"  # drained, kept warm for a fast rollback
    STOPPED = "stopped"
    FAILED = "failed"


class ReloadInProgress(RuntimeError):
    """Another reload or rollback holds the manager; one runs at a time (HTTP 409)."""


class NoModelLoaded(RuntimeError):
    """``serve`` was called before ``initialize_first_worker`` succeeded."""


class NoPreviousVersion(RuntimeError):
    """``rollback`` was asked for, but no earlier version has served in this process."""


class WarmupError(RuntimeError):
    """The warm-up raised or produced a non-finite output."""


class ValidationFailed(RuntimeError):
    """The loaded model failed the validation step (for example non-finite parameters)."""


class LoadTimeout(RuntimeError):
    """The loader did not return within ``load_timeout``; the reload fails as ``load_failed``.

    Python cannot stop a thread, so the loader's thread is abandoned: it is counted, logged,
    and whatever it returns later is discarded.
    """

    reason = "load_timeout"
    reload_result = ReloadResult.LOAD_FAILED.value

    def to_dict(self) -> dict[str, str]:
        """A structured description for API answers and reload records."""
        return {"type": type(self).__name__, "reason": self.reason, "message": str(self)}


class DrainTimeoutExceeded(RuntimeError):
    """The request outlived ``drain_timeout`` on a retired worker and its answer is withheld.

    Attributes:
        retry_after: seconds after which the client should retry (the new worker serves).
    """

    def __init__(self, worker: str, retry_after: int) -> None:
        super().__init__(
            f"{worker} was retired while this request ran past the drain timeout; retry"
        )
        self.retry_after = retry_after


class ReloadObserver(Protocol):
    """Where the manager reports what it does (the metrics seam; no Prometheus import here)."""

    def on_phase(self, phase: ReloadPhase, seconds: float) -> None:
        """A phase of a reload finished after ``seconds``."""

    def on_reload(self, result: ReloadResult) -> None:
        """A reload (or rollback) ended with ``result``."""

    def on_model_info(self, role: str, version: str, value: float) -> None:
        """``version`` took (1) or left (0) ``role`` (``current`` or ``draining``)."""

    def on_drain_timeout(self, remaining: int, action: DrainTimeoutAction) -> None:
        """``remaining`` requests were still running when the drain timed out."""

    def on_inflight(self, worker: str, value: int) -> None:
        """``worker`` now has ``value`` requests in flight."""

    def on_load_abandoned(self, version: str | None) -> None:
        """A loader passed its deadline and its thread was abandoned (it may run on)."""


class NullObserver:
    """A ``ReloadObserver`` that records nothing."""

    def on_phase(self, phase: ReloadPhase, seconds: float) -> None:
        """Ignore."""

    def on_reload(self, result: ReloadResult) -> None:
        """Ignore."""

    def on_model_info(self, role: str, version: str, value: float) -> None:
        """Ignore."""

    def on_drain_timeout(self, remaining: int, action: DrainTimeoutAction) -> None:
        """Ignore."""

    def on_inflight(self, worker: str, value: int) -> None:
        """Ignore."""

    def on_load_abandoned(self, version: str | None) -> None:
        """Ignore."""


@dataclass(eq=False)
class Worker(Generic[M]):
    """One loaded model generation and its request counters."""

    worker_id: int
    version: str
    model: M | None
    status: WorkerStatus = WorkerStatus.LOADING
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    served: int = 0
    errors: int = 0
    drain_expired: bool = False

    @property
    def name(self) -> str:
        """``worker-<id>``, as in the log lines."""
        return f"worker-{self.worker_id}"


@dataclass(frozen=True)
class WorkerInfo:
    """A snapshot of the serving worker (``get_current_worker_info``)."""

    worker_id: int
    name: str
    status: WorkerStatus
    version: str
    loaded_at: float
    in_flight: int
    served: int
    errors: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the status as its string value)."""
        out = asdict(self)
        out["status"] = self.status.value
        return out


@dataclass
class ReloadRecord:
    """What happened in one reload or rollback; kept for ``GET /admin/model/reload/{id}``."""

    reload_id: str
    kind: str
    requested_version: str | None
    phase: ReloadPhase = ReloadPhase.LOADING
    result: ReloadResult | None = None
    error: dict[str, str] | None = None
    from_worker: str | None = None
    to_worker: str | None = None
    from_version: str | None = None
    to_version: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    switch_seconds: float | None = None
    drain_remaining: int = 0
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    # Called with the finished record while the reload lock is still held, before ``done`` is
    # set: a follow-up (rewriting CURRENT) cannot interleave with the next reload.
    on_done: Callable[[ReloadRecord], None] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the admin API."""
        return {
            "reload_id": self.reload_id,
            "kind": self.kind,
            "requested_version": self.requested_version,
            "phase": self.phase.value,
            "result": self.result.value if self.result else None,
            "error": self.error,
            "from_worker": self.from_worker,
            "to_worker": self.to_worker,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "phase_seconds": dict(self.phase_seconds),
            "switch_seconds": self.switch_seconds,
            "drain_remaining": self.drain_remaining,
        }


@dataclass(frozen=True)
class Lease(Generic[M]):
    """The worker a request was admitted to; it keeps it until the request ends."""

    model: M
    version: str
    worker: str


def release_memory(*, collect: bool = True) -> None:
    """Return freed model memory to the OS: an optional GC pass, then glibc ``malloc_trim(0)``.

    Without the trim, glibc keeps freed arenas mapped and RSS only grows across reloads
    (research note §3.1: the Triton leak reports). The GC pass is optional because a full
    ``gc.collect()`` costs 0.4-0.6 s with torch and transformers imported (measured here) and
    holds the GIL, stalling every request; callers run it only when a cycle kept a model alive.
    """
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)  # ctypes releases the GIL for the call


def _load_libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def all_finite(value: Any) -> bool:
    """True when every tensor and float inside ``value`` (nested containers too) is finite."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return all(all_finite(v) for v in value)
    return True


def _default_validate(model: Any) -> None:
    """Refuse a model whose parameters are not finite (a NaN export loads but serves garbage)."""
    module = getattr(model, "model", model)
    if isinstance(module, torch.nn.Module):
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not tensor_is_finite(tensor):
                raise ValidationFailed(f"parameter {name!r} has non-finite values")


def tensor_is_finite(tensor: torch.Tensor, chunk: int = 1 << 18) -> bool:
    """True when every element of ``tensor`` is finite, checked in chunks of ``chunk``."""
    # torch.isfinite on a whole tensor allocates temporaries worth ~2x the tensor (measured:
    # +121 MB for a 69 MB policy), which would break the 2.2x peak-memory bound of a reload.
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


class HotReloadManager(Generic[M]):
    """Serve one model generation and swap in the next without dropping requests.

    One manager serves one model line (the policy; the LLM brief gets a line of its own), with
    its own load deadline, warm-up and drain.

    Args:
        model_loader: ``model_loader(version)`` returns the loaded model; ``version`` is the
            name passed to ``reload`` (``None`` = the loader's default). A loader that takes no
            argument (the operations guide's ``load_model()``) is called without one. If the
            returned object has a ``version`` attribute it names the worker's version.
        warmup_func: called ``warmup_func(model)`` ``warmup_steps`` times before the switch;
            raising, or returning anything with a non-finite number, fails the reload.
        warmup_steps: number of warm-up calls (default 5).
        drain_timeout: seconds to wait for the old worker's in-flight requests (default 30).
        drain_timeout_action: ``leave_running`` (default) or ``reject`` (503 + Retry-After).
        validate_func: ``validate_func(model)`` raises on a bad model; default: every floating
            parameter of an ``nn.Module`` (or ``model.model``) must be finite.
        keep_previous_s: keep the old worker warm this long after a switch for an instant
            rollback (default 0: stop it as soon as it is drained).
        revert_error_rate: while the old worker is kept warm, revert to it when the new
            worker's error rate reaches this fraction (``None`` disables; default 0.5).
        revert_min_requests: requests the new worker must have served before the error rate
            counts (default 20; a single early error is not a trend).
        observer: receives phase timings, results, model info and drain timeouts.
        history_size: reload records kept for status queries (default 64).
        load_timeout: seconds the loader may take (``None``, the default: no deadline). Past
            it the reload fails as ``load_failed`` and the next one may start; the loader's
            thread, which Python cannot stop, is abandoned, counted and its result discarded.
    """

    def __init__(
        self,
        model_loader: Callable[[str | None], M] | Callable[[], M],
        warmup_func: Callable[[M], Any] | None = None,
        warmup_steps: int = 5,
        drain_timeout: float = 30.0,
        *,
        drain_timeout_action: DrainTimeoutAction | str = DrainTimeoutAction.LEAVE_RUNNING,
        validate_func: Callable[[M], None] | None = _default_validate,
        keep_previous_s: float = 0.0,
        revert_error_rate: float | None = 0.5,
        revert_min_requests: int = 20,
        observer: ReloadObserver | None = None,
        history_size: int = 64,
        load_timeout: float | None = None,
    ) -> None:
        if load_timeout is not None and load_timeout <= 0:
            raise ValueError(f"load_timeout must be > 0 seconds or None, got {load_timeout}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds, got {drain_timeout}")
        self.model_loader = model_loader
        self._loader_takes_version = _takes_an_argument(model_loader)
        self.load_timeout = load_timeout
        self.abandoned_loads_total = 0
        self.abandoned_loaders_running = 0
        self.warmup_func = warmup_func
        self.warmup_steps = warmup_steps
        self.drain_timeout = drain_timeout
        self.drain_timeout_action = DrainTimeoutAction(drain_timeout_action)
        self.validate_func = validate_func
        self.keep_previous_s = keep_previous_s
        self.revert_error_rate = revert_error_rate
        self.revert_min_requests = revert_min_requests
        self.observer: ReloadObserver = observer or NullObserver()
        self.drain_timeouts_total = 0
        # Called with the record of an automatic revert (error rate), like ``on_done``: the
        # CURRENT follower points CURRENT back, or it would reload the failing version again.
        self.on_auto_revert: Callable[[ReloadRecord], None] | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._reload_lock = threading.Lock()
        self._ids = itertools.count()
        self._current: Worker[M] | None = None
        self._standby: Worker[M] | None = None
        self._version_history: list[str] = []
        self._records: OrderedDict[str, ReloadRecord] = OrderedDict()
        self._history_size = history_size

    # ------------------------------------------------------------------ serving path

    @contextlib.contextmanager
    def lease(self) -> Iterator[Lease[M]]:
        """Admit a request to the current worker for the duration of the ``with`` block.

        Raises:
            NoModelLoaded: before the first worker is up.
            DrainTimeoutExceeded: on exit, when the worker was retired with
                ``drain_timeout_action='reject'`` while this request ran past the timeout.
        """
        worker = self._acquire()
        assert worker.model is not None
        try:
            yield Lease(model=worker.model, version=worker.version, worker=worker.name)
        except BaseException:
            self._release(worker, failed=True)
            raise
        if self._release(worker, failed=False):
            raise DrainTimeoutExceeded(worker.name, retry_after=1)

    def serve(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run ``fn(model, *args, **kwargs)`` on the current worker and return its result."""
        with self.lease() as lease:
            return fn(lease.model, *args, **kwargs)

    async def aserve(self, fn: Callable[..., R | Awaitable[R]], *args: Any, **kwargs: Any) -> R:
        """Async ``serve``: awaits a coroutine ``fn``; runs a plain ``fn`` in a worker thread."""
        with self.lease() as lease:
            if inspect.iscoroutinefunction(fn):
                result: R = await fn(lease.model, *args, **kwargs)
            else:
                result = await asyncio.to_thread(fn, lease.model, *args, **kwargs)  # type: ignore[arg-type]
            return result

    def _acquire(self) -> Worker[M]:
        with self._lock:
            worker = self._current
            if worker is None:
                raise NoModelLoaded("no model is loaded yet; call initialize_first_worker()")
            worker.inflight += 1
            inflight = worker.inflight
        self.observer.on_inflight(worker.name, inflight)
        return worker

    def _release(self, worker: Worker[M], *, failed: bool) -> bool:
        """Count the request out; return True when its answer must be withheld."""
        revert = False
        with self._lock:
            worker.inflight -= 1
            worker.served += 1
            if failed:
                worker.errors += 1
                revert = self._should_revert(worker)
            if worker.inflight == 0:
                self._idle.notify_all()
            inflight = worker.inflight
            withhold = (
                worker.drain_expired and self.drain_timeout_action is DrainTimeoutAction.REJECT
            )
        self.observer.on_inflight(worker.name, inflight)
        if revert:
            threading.Thread(target=self._auto_revert, name="lf-auto-revert", daemon=True).start()
        return withhold and not failed

    def _should_revert(self, worker: Worker[M]) -> bool:
        # Called under self._lock: only the serving worker, only while a standby exists.
        if self.revert_error_rate is None or self._standby is None or worker is not self._current:
            return False
        if worker.served < self.revert_min_requests:
            return False
        return worker.errors / worker.served >= self.revert_error_rate

    def _auto_revert(self) -> None:
        with contextlib.suppress(ReloadInProgress, NoPreviousVersion):
            log.warning(
                "error rate of the new worker crossed %.2f: reverting", self.revert_error_rate
            )
            self.rollback(reason="error_rate", on_done=self.on_auto_revert)

    # ------------------------------------------------------------------ lifecycle

    def initialize_first_worker(self, version: str | None = None) -> WorkerInfo:
        """Load, validate and warm up the first worker, then serve it.

        Raises:
            ReloadInProgress: a worker already exists or a reload runs; use ``reload``.
            Exception: whatever the loader, validator or warm-up raised (startup must fail loudly).
        """
        if not self._reload_lock.acquire(blocking=False):
            raise ReloadInProgress("a reload is running")
        try:
            if self._current is not None:
                raise ReloadInProgress("the first worker is already serving; use reload()")
            record = ReloadRecord(reload_id="initial", kind="initial", requested_version=version)
            worker = self._prepare_worker(record, version)
            worker.status = WorkerStatus.SERVING
            with self._lock:
                self._current = worker
            self._version_history.append(worker.version)
            self.observer.on_model_info("current", worker.version, 1.0)
            log.info("[%s] serving version %s", worker.name, worker.version)
            return self._info(worker)
        finally:
            self._reload_lock.release()

    def reload(self, version: str | None = None, *, reload_id: str | None = None) -> bool:
        """Swap in ``version`` (loader default when ``None``); True when it now serves.

        Blocks through the drain. A failure leaves the old worker serving and returns False;
        the record (``get_reload``) says which phase failed and why.

        Raises:
            ReloadInProgress: another reload or rollback runs.
        """
        record = self._begin("reload", version, reload_id)
        return self._run_reload(record)

    def start_reload(
        self,
        version: str | None = None,
        *,
        on_done: Callable[[ReloadRecord], None] | None = None,
    ) -> ReloadRecord:
        """Start a reload in a background thread and return its record at once.

        Args:
            version: the version to load (``None`` = the loader's default).
            on_done: called with the finished record (success or failure) on the reload
                thread, before the next reload may start; an exception in it is logged.

        Raises:
            ReloadInProgress: another reload or rollback runs (raised here, synchronously).
        """
        record = self._begin("reload", version, None)
        record.on_done = on_done
        threading.Thread(
            target=self._run_reload,
            args=(record,),
            name=f"lf-reload-{record.reload_id}",
            daemon=True,
        ).start()
        return record

    def rollback(
        self,
        *,
        reason: str = "manual",
        reload_id: str | None = None,
        on_done: Callable[[ReloadRecord], None] | None = None,
    ) -> bool:
        """Serve the previous version again: the warm standby if kept, else reload it.

        ``on_done`` is called as in ``start_reload``.

        Raises:
            ReloadInProgress: another reload or rollback runs.
            NoPreviousVersion: no earlier version has served in this process.
        """
        record, standby = self._begin_rollback(reload_id)
        record.on_done = on_done
        return self._execute_rollback(record, standby, reason)

    def start_rollback(
        self,
        *,
        reason: str = "manual",
        on_done: Callable[[ReloadRecord], None] | None = None,
    ) -> ReloadRecord:
        """Start a rollback in a background thread and return its record at once.

        ``on_done`` is called as in ``start_reload``.

        Raises:
            ReloadInProgress: another reload or rollback runs (raised here, synchronously).
            NoPreviousVersion: no earlier version has served in this process.
        """
        record, standby = self._begin_rollback(None)
        record.on_done = on_done
        threading.Thread(
            target=self._execute_rollback,
            args=(record, standby, reason),
            name=f"lf-rollback-{record.reload_id}",
            daemon=True,
        ).start()
        return record

    def _begin_rollback(self, reload_id: str | None) -> tuple[ReloadRecord, Worker[M] | None]:
        record = self._begin("rollback", None, reload_id)
        with self._lock:
            standby, self._standby = self._standby, None
        if standby is not None and standby.model is not None:
            record.requested_version = record.to_version = standby.version
            return record, standby
        previous = self.previous_version()
        if previous is None:
            self._records.pop(record.reload_id, None)
            self._reload_lock.release()
            raise NoPreviousVersion("no earlier version has served in this process")
        record.requested_version = previous
        return record, None

    def _execute_rollback(
        self, record: ReloadRecord, standby: Worker[M] | None, reason: str
    ) -> bool:
        if standby is None:
            return self._run_reload(record, success=ReloadResult.ROLLED_BACK)
        try:
            log.info("=== Model rollback started (%s) ===", reason)
            self._swap_to(record, standby, ReloadResult.ROLLED_BACK)
            log.info("=== Model rollback finished ===")
            return True
        finally:
            self._end(record)

    def previous_version(self) -> str | None:
        """The version that served before the current one, if any."""
        current = self._current.version if self._current else None
        for version in reversed(self._version_history):
            if version != current:
                return version
        return None

    def shutdown(self) -> None:
        """Stop every worker and release their memory (the process is exiting)."""
        with self._lock:
            workers = [w for w in (self._current, self._standby) if w is not None]
            self._current = None
            self._standby = None
        for worker in workers:
            self._stop(worker)

    # ------------------------------------------------------------------ queries

    def get_current_worker_info(self) -> WorkerInfo:
        """Snapshot of the serving worker.

        Raises:
            NoModelLoaded: before the first worker is up.
        """
        with self._lock:
            worker = self._current
            if worker is None:
                raise NoModelLoaded("no model is loaded yet")
            return self._info(worker)

    def get_standby_info(self) -> WorkerInfo | None:
        """Snapshot of the warm previous worker, if one is kept."""
        with self._lock:
            return self._info(self._standby) if self._standby else None

    def get_reload(self, reload_id: str) -> ReloadRecord | None:
        """The record of a recent reload or rollback."""
        return self._records.get(reload_id)

    @property
    def reloading(self) -> bool:
        """True while a reload or rollback runs."""
        return self._reload_lock.locked()

    @property
    def current_version(self) -> str | None:
        """The serving version, or ``None`` before the first worker."""
        worker = self._current
        return worker.version if worker else None

    @staticmethod
    def _info(worker: Worker[Any]) -> WorkerInfo:
        return WorkerInfo(
            worker_id=worker.worker_id,
            name=worker.name,
            status=worker.status,
            version=worker.version,
            loaded_at=worker.loaded_at,
            in_flight=worker.inflight,
            served=worker.served,
            errors=worker.errors,
        )

    # ------------------------------------------------------------------ reload internals

    def _begin(self, kind: str, version: str | None, reload_id: str | None) -> ReloadRecord:
        if not self._reload_lock.acquire(blocking=False):
            raise ReloadInProgress(
                "a reload is already running; wait for it (GET /admin/model/reload/{id})"
            )
        if self._current is None:
            self._reload_lock.release()
            raise NoModelLoaded("no model is loaded yet; call initialize_first_worker()")
        record = ReloadRecord(
            reload_id=reload_id or uuid.uuid4().hex[:12], kind=kind, requested_version=version
        )
        self._records[record.reload_id] = record
        while len(self._records) > self._history_size:
            self._records.popitem(last=False)
        return record

    def _run_reload(
        self, record: ReloadRecord, success: ReloadResult = ReloadResult.SUCCESS
    ) -> bool:
        try:
            log.info("=== Model reload started ===")
            # Memory bound: at most the serving model plus the one being loaded (the research
            # note's 2x), so a kept-warm standby is dropped before loading a third.
            with self._lock:
                standby, self._standby = self._standby, None
            if (
                standby is not None
                and standby.model is not None
                and standby.version == record.requested_version
            ):
                # CURRENT pointed back at the kept version (a rollback in another process).
                if not self._swap_to(record, standby, success):
                    return False
                log.info("=== Model reload finished (kept worker reused) ===")
                return True
            if standby is not None:
                self._stop(standby)
            new: Worker[M] | None = None
            try:
                new = self._prepare_worker(record, record.requested_version)
            except Exception as exc:
                log.error(
                    "=== Model reload failed in %s: %s: %s ===",
                    record.phase.value,
                    type(exc).__name__,
                    exc,
                )
                self._finish(record, _result_for(exc, record.phase), error=_describe(exc))
            if new is None:
                # Outside the except block: the traceback no longer pins the failed model.
                release_memory(collect=False)
                return False
            if not self._switch_and_drain(record, new):
                self._finish(record, ReloadResult.REJECTED, error=_SHUT_DOWN)
                log.info("=== Model reload abandoned: the service shut down ===")
                return False
            self._finish(record, success, error=None)
            log.info("=== Model reload finished ===")
            return True
        finally:
            self._end(record)

    def _end(self, record: ReloadRecord) -> None:
        # The lock goes first: whoever waits on `done` may start the next reload at once.
        self._reload_lock.release()
        record.done.set()

    def _prepare_worker(self, record: ReloadRecord, version: str | None) -> Worker[M]:
        worker: Worker[M] = Worker(worker_id=next(self._ids), version=version or "", model=None)
        record.to_worker = worker.name
        log.info("[%s] loading + warm-up", worker.name)
        try:
            with self._phase(record, ReloadPhase.LOADING):
                worker.model = self._load(version)
                worker.version = str(
                    getattr(worker.model, "version", None) or version or worker.name
                )
                record.to_version = worker.version
            with self._phase(record, ReloadPhase.VALIDATING):
                if self.validate_func is not None:
                    self.validate_func(worker.model)
            with self._phase(record, ReloadPhase.WARMING):
                self._warm_up(worker.model)
        except BaseException:
            worker.status = WorkerStatus.FAILED
            worker.model = None
            raise
        worker.loaded_at = time.time()
        return worker

    def _call_loader(self, version: str | None) -> M:
        if self._loader_takes_version:
            return self.model_loader(version)  # type: ignore[call-arg]
        return self.model_loader()  # type: ignore[call-arg]

    def _load(self, version: str | None) -> M:
        """Run the loader, bounded by ``load_timeout`` when one is set."""
        if self.load_timeout is None:
            return self._call_loader(version)
        attempt: _LoadAttempt[M] = _LoadAttempt()
        thread = threading.Thread(
            target=self._run_loader,
            args=(version, attempt),
            name=f"lf-load-{version or 'default'}",
            daemon=True,  # an abandoned loader must not keep the process from exiting
        )
        thread.start()
        attempt.finished.wait(self.load_timeout)
        with attempt.lock:
            if attempt.finished.is_set():
                if attempt.error is not None:
                    raise attempt.error
                return attempt.model  # type: ignore[return-value]
            attempt.abandoned = True
        with self._lock:
            self.abandoned_loads_total += 1
            self.abandoned_loaders_running += 1
        log.error(
            "loading %s took longer than load_timeout=%.1f s: the reload fails and the next "
            "one may start; the loader thread cannot be stopped and is abandoned (%d running), "
            "its result will be discarded. Check the export's files, or raise the load timeout "
            "of this model line for models that load slowly.",
            version or "the default version",
            self.load_timeout,
            self.abandoned_loaders_running,
        )
        self.observer.on_load_abandoned(version)
        raise LoadTimeout(
            f"loading {version or 'the default version'} took longer than "
            f"load_timeout={self.load_timeout:g} s; the reload failed, the serving version is "
            "unchanged. Check the export (a file that never ends?), or raise the load timeout."
        )

    def _run_loader(self, version: str | None, attempt: _LoadAttempt[M]) -> None:
        model: M | None = None
        error: BaseException | None = None
        try:
            model = self._call_loader(version)
        except BaseException as exc:  # handed to the waiting reload thread
            error = exc
        with attempt.lock:
            if not attempt.abandoned:
                attempt.model, attempt.error = model, error
                attempt.finished.set()
                return
        # Past the deadline: the reload already failed, so what the loader made is dropped.
        del model, error
        with self._lock:
            self.abandoned_loaders_running -= 1
        log.warning("an abandoned loader of %s returned; its result is discarded", version)
        release_memory(collect=False)

    def _warm_up(self, model: M) -> None:
        if self.warmup_func is None:
            return
        for step in range(self.warmup_steps):
            try:
                out = self.warmup_func(model)
            except Exception as exc:
                raise WarmupError(
                    f"warm-up step {step + 1} raised {type(exc).__name__}: {exc}"
                ) from exc
            if not all_finite(out):
                raise WarmupError(f"warm-up step {step + 1} produced non-finite output")

    @contextlib.contextmanager
    def _phase(self, record: ReloadRecord, phase: ReloadPhase) -> Iterator[None]:
        record.phase = phase
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        record.phase_seconds[phase.value] = seconds
        self.observer.on_phase(phase, seconds)

    def _switch_and_drain(self, record: ReloadRecord, new: Worker[M]) -> bool:
        """Switch to ``new``, drain and retire the old worker; False (``new`` stopped, nothing
        switched) when the manager was shut down while ``new`` was being prepared."""
        with self._phase(record, ReloadPhase.SWITCHING):
            start = time.perf_counter()
            with self._lock:
                old = self._current
                if old is None:  # shutdown() ran during the load: serve nothing new
                    new.status = WorkerStatus.STOPPED
                else:
                    new.status = WorkerStatus.SERVING
                    old.status = WorkerStatus.DRAINING
                    self._current = new
            record.switch_seconds = time.perf_counter() - start
        if old is None:
            self._stop(new)
            return False
        record.from_worker, record.from_version = old.name, old.version
        self._version_history.append(new.version)
        log.info("Traffic switched: %s -> %s", old.name, new.name)
        self.observer.on_model_info("current", old.version, 0.0)
        self.observer.on_model_info("draining", old.version, 1.0)
        self.observer.on_model_info("current", new.version, 1.0)
        self._drain(record, old)
        self.observer.on_model_info("draining", old.version, 0.0)
        if self.keep_previous_s > 0:
            old.status = WorkerStatus.STANDBY
            with self._lock:
                self._standby = old
            timer = threading.Timer(self.keep_previous_s, self._retire_standby, args=(old,))
            timer.daemon = True
            timer.start()
            log.info("[%s] kept warm for %.0f s (rollback window)", old.name, self.keep_previous_s)
        else:
            with self._phase(record, ReloadPhase.STOPPED):
                self._stop(old)
        return True

    def _drain(self, record: ReloadRecord, old: Worker[M]) -> None:
        with self._phase(record, ReloadPhase.DRAINING):
            with self._lock:
                log.info("[%s] draining (in-flight: %d)", old.name, old.inflight)
                drained = self._idle.wait_for(lambda: old.inflight == 0, self.drain_timeout)
                remaining = old.inflight
                if not drained:
                    old.drain_expired = True
            if not drained:
                record.drain_remaining = remaining
                self.drain_timeouts_total += remaining
                log.warning("[%s] drain timeout (remaining: %d)", old.name, remaining)
                self.observer.on_drain_timeout(remaining, self.drain_timeout_action)

    def _swap_to(self, record: ReloadRecord, standby: Worker[M], result: ReloadResult) -> bool:
        """Switch back to a kept-warm worker: no load, no warm-up (it served until now)."""
        record.to_worker, record.to_version = standby.name, standby.version
        if self._switch_and_drain(record, standby):
            self._finish(record, result, error=None)
            return True
        self._finish(record, ReloadResult.REJECTED, error=_SHUT_DOWN)
        return False

    def _retire_standby(self, worker: Worker[M]) -> None:
        with self._lock:
            if self._standby is not worker:
                return
            self._standby = None
        self._stop(worker)

    def _stop(self, worker: Worker[M]) -> None:
        worker.status = WorkerStatus.STOPPED
        if callable(getattr(worker.model, "close", None)):
            # A model with threads of its own (the brief LLM's batcher) lets them end, or they
            # would keep the retired model alive. (No bound method kept in a local: it would
            # hold the model past the survivor check below and cost a full GC pass.)
            worker.model.close()  # type: ignore[union-attr]
        survivor = _weak(worker.model)
        worker.model = None
        with self._lock:
            # A request still running (drain timeout) holds the model; it is freed when that
            # request ends, and a GC pass now could not free it anyway.
            busy = worker.inflight > 0
        # Dropping the last reference frees an nn.Module's tensors at once (no cycles); the
        # costly GC pass runs only if something still holds the model through a cycle.
        release_memory(collect=not busy and (survivor is None or survivor() is not None))
        log.info("[%s] stopped", worker.name)

    def _finish(
        self, record: ReloadRecord, result: ReloadResult, *, error: dict[str, str] | None
    ) -> None:
        if result not in (ReloadResult.SUCCESS, ReloadResult.ROLLED_BACK):
            record.phase = ReloadPhase.FAILED
        record.result = result
        record.error = error
        record.finished_at = time.time()
        self.observer.on_reload(result)
        if record.on_done is not None:
            try:
                record.on_done(record)
            except Exception:  # the reload itself is over; its follow-up must not kill it
                log.exception("the follow-up of reload %s failed", record.reload_id)


@dataclass(eq=False)
class _LoadAttempt(Generic[M]):
    """One loader call under a deadline: whoever gets ``lock`` first decides its fate."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False
    model: M | None = None
    error: BaseException | None = None


def _takes_an_argument(loader: Callable[..., Any]) -> bool:
    """Whether ``loader`` accepts the version (the guide's ``load_model()`` takes none)."""
    try:
        signature = inspect.signature(loader)
    except (TypeError, ValueError):  # no signature to read (some builtins): the documented form
        return True
    try:
        signature.bind(None)
    except TypeError:
        return False
    return True


def _weak(obj: Any) -> weakref.ref[Any] | None:
    """A weak reference to ``obj`` (``None`` for objects that cannot have one)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _result_for(exc: BaseException, phase: ReloadPhase) -> ReloadResult:
    """Map a failure to its metric label: the error's own label, else the phase it broke."""
    label = getattr(exc, "reload_result", None)
    if isinstance(label, str):
        with contextlib.suppress(ValueError):
            return ReloadResult(label)
    return {
        ReloadPhase.VALIDATING: ReloadResult.VALIDATION_FAILED,
        ReloadPhase.WARMING: ReloadResult.WARMUP_FAILED,
    }.get(phase, ReloadResult.LOAD_FAILED)


_SHUT_DOWN = {
    "type": "ShutDown",
    "reason": "shut_down",
    "message": "the service shut down before the switch; the new worker was stopped",
}


def _describe(exc: BaseException) -> dict[str, str]:
    to_dict = getattr(exc, "to_dict", None)
    if callable(to_dict):
        described = to_dict()
        if isinstance(described, dict):
            return {str(k): str(v) for k, v in described.items()}
    return {"type": type(exc).__name__, "reason": type(exc).__name__, "message": str(exc)}
