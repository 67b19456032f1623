"""Keep one model line in step with its export store's ``CURRENT`` pointer (DESIGN.md §7).

Every serving process (uvicorn workers, replicas sharing the store) follows ``CURRENT``: an
admin reload or rollback swaps this process's model first and then rewrites ``CURRENT``; the
other processes notice the change and run their own swap. This module holds that protocol and
nothing of HTTP: the first load (with a fallback when ``CURRENT`` cannot serve), following
``CURRENT``, promoting new exports only after they passed a reload's checks, and remembering
versions that failed here so they are not retried in a loop.

One ``CurrentSync`` serves one model line (one ``HotReloadManager`` over one store, with its
own pointer, name and load deadline); a second line (the LLM brief) gets its own. The pointer
is behind a two-method interface: ``LocalPointer`` is the export directory's ``CURRENT`` file
(watched with file events), ``FsspecPointer`` any fsspec URL, such as the ``CURRENT`` object of
an export store on S3 (polled every ``reconcile_interval_s``: object stores send no events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import watchfiles

from lightning_fragrance.labels import ModelRole, ReloadResult
from lightning_fragrance.serving.hot_reload import (
    HotReloadManager,
    NoModelLoaded,
    ReloadInProgress,
    ReloadRecord,
    WorkerInfo,
)
from lightning_fragrance.serving.loading import CURRENT_FILE, ExportStore
from lightning_fragrance.serving.object_store import ObjectStoreExports, read_pointer, write_pointer

log = logging.getLogger(__name__)

_SERVES = (ReloadResult.SUCCESS, ReloadResult.ROLLED_BACK)


class Pointer(Protocol):
    """Where a model line's ``CURRENT`` lives."""

    @property
    def location(self) -> str:
        """A path or URL for messages."""

    def read(self) -> str | None:
        """The version it names, or ``None`` when there is no valid pointer."""

    def write(self, version: str) -> None:
        """Name ``version``, atomically for every reader."""


class LocalPointer:
    """``<export_dir>/CURRENT`` on a local or network filesystem (temp file, fsync, rename)."""

    def __init__(self, store: ExportStore) -> None:
        self.store = store

    @property
    def location(self) -> str:
        """The file's path."""
        return str(self.store.root / CURRENT_FILE)

    def read(self) -> str | None:
        """The version ``CURRENT`` names (a regular file of at most 4 KiB), or ``None``."""
        return self.store.current()

    def write(self, version: str) -> None:
        """Point ``CURRENT`` at ``version``, which must exist in the store."""
        self.store.set_current(version)


class FsspecPointer:
    """A ``CURRENT`` object behind any fsspec URL (``s3://bucket/exports/CURRENT``, ``memory://``).

    Read by polling (``CurrentSync.poll``): object stores send no file events. An upload
    replaces an object atomically, which is what the rename gives ``LocalPointer``.

    Args:
        url: the pointer's URL.
        fs: a filesystem to use instead of the one fsspec infers (``url`` is then its path).
    """

    def __init__(self, url: str, *, fs: fsspec.AbstractFileSystem | None = None) -> None:
        if fs is None:
            fs, url = fsspec.core.url_to_fs(url)
        self.fs: fsspec.AbstractFileSystem = fs
        self.path = url

    @property
    def location(self) -> str:
        """The object's URL."""
        return str(self.fs.unstrip_protocol(self.path))

    def read(self) -> str | None:
        """The version the object names, or ``None`` (missing, too large, not a name)."""
        return read_pointer(self.fs, self.path)

    def write(self, version: str) -> None:
        """Upload ``version`` as the object's whole content."""
        write_pointer(self.fs, self.path, version)


def default_pointer(store: ExportStore) -> Pointer:
    """The store's own ``CURRENT``: a file beside the versions, or the object store's object."""
    if isinstance(store, ObjectStoreExports):
        return FsspecPointer(store.current_path, fs=store.fs)
    return LocalPointer(store)


@dataclass(frozen=True)
class Fallback:
    """This process serves another version than ``CURRENT`` names, because that one failed.

    Attributes:
        wanted: the version ``CURRENT`` names.
        serving: the newest valid version, served instead.
        reason: why ``wanted`` could not serve (the error's type and message).
    """

    wanted: str
    serving: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form for ``/ready`` and ``GET /admin/model``."""
        return {"wanted": self.wanted, "serving": self.serving, "reason": self.reason}


class CurrentSync:
    """Follow ``CURRENT`` for one model line; write it after admin operations.

    Args:
        store: the line's export store (versions are listed and loaded from it).
        manager: the line's reload manager (its loader takes a version name).
        pointer: where the line's ``CURRENT`` lives (default: the store's own, a file for a
            directory and an object for an object store: ``default_pointer``).
        name: the line's name in log lines (``policy``, ``brief``).
        auto_promote: point ``CURRENT`` at each new complete export, once it has loaded,
            validated and warmed up here (a bad export is never promoted).
        stopping: returns True once the process shuts down (no more reloads then).
    """

    def __init__(
        self,
        store: ExportStore,
        manager: HotReloadManager[Any],
        *,
        pointer: Pointer | None = None,
        name: str = "policy",
        auto_promote: bool = False,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.manager = manager
        self.pointer: Pointer = pointer or default_pointer(store)
        self.name = name
        self.auto_promote = auto_promote
        self.stopping = stopping
        # Versions that failed to load here: not retried by the follower (an admin reload may).
        self.failed: set[str] = set()
        self.fallback: Fallback | None = None
        manager.on_auto_revert = self._after_revert

    # ------------------------------------------------------------------ first load

    def start(self) -> WorkerInfo:
        """Load the first worker: ``CURRENT``'s version, else the newest export.

        If ``CURRENT`` names a version that cannot serve, the newest valid one serves instead,
        ``CURRENT`` is left as it is, and the process reports itself degraded (``fallback``).

        Raises:
            Exception: what the loader raised when no version can serve (startup fails).
        """
        wanted = self.pointer.read()
        first = wanted or self.store.newest()
        try:
            info = self.manager.initialize_first_worker(first)
        except Exception as exc:
            if first is None:
                raise
            self.failed.add(first)
            info = self._serve_newest_valid(first, exc, degraded=wanted is not None)
        if self.pointer.read() is None:
            self.pointer.write(info.version)
        return info

    def _serve_newest_valid(self, failed: str, error: Exception, *, degraded: bool) -> WorkerInfo:
        for candidate in reversed(self.store.complete_versions()):
            if candidate in self.failed:
                continue
            try:
                info = self.manager.initialize_first_worker(candidate)
            except Exception as exc:  # try the next older one
                log.error("fallback candidate %s cannot serve either: %s", candidate, exc)
                self.failed.add(candidate)
                continue
            if degraded:
                self._degrade(failed, info.version, error)
            return info
        raise error

    def _degrade(self, wanted: str, serving: str, error: Exception) -> None:
        self.fallback = Fallback(wanted, serving, f"{type(error).__name__}: {error}")
        log.error(
            "DEGRADED [%s]: CURRENT names %s, which cannot serve (%s: %s). Serving %s, the "
            "newest valid export, instead; CURRENT is left as it is. Re-export %s, or point "
            "CURRENT at a valid version (POST /admin/model/reload).",
            self.name,
            wanted,
            type(error).__name__,
            error,
            serving,
            wanted,
        )
        self.manager.observer.on_model_info(ModelRole.FALLBACK.value, serving, 1.0)

    # ------------------------------------------------------------------ admin operations

    def reload(self, version: str) -> ReloadRecord:
        """Start an admin reload; ``CURRENT`` follows once it serves.

        Raises:
            ReloadInProgress: another reload or rollback runs.
        """
        return self.manager.start_reload(version, on_done=self._after_admin)

    def rollback(self) -> ReloadRecord:
        """Start an admin rollback; ``CURRENT`` follows once it serves.

        Raises:
            ReloadInProgress: another reload or rollback runs.
            NoPreviousVersion: nothing to roll back to in this process.
        """
        return self.manager.start_rollback(on_done=self._after_admin)

    def _after_admin(self, record: ReloadRecord) -> None:
        # Runs before the next reload may start, so the follower never sees the new model
        # beside the old CURRENT and "corrects" it back.
        if record.result in _SERVES and record.to_version:
            self.pointer.write(record.to_version)
            self.failed.discard(record.to_version)
            self.fallback = None
            log.info("[%s] CURRENT -> %s", self.name, record.to_version)

    def _after_revert(self, record: ReloadRecord) -> None:
        # The new version failed its requests here; every process serves the same version, so
        # CURRENT goes back for all of them (what an admin rollback does), and the follower
        # never reloads the failing one again on its own.
        if record.result in _SERVES and record.to_version:
            if record.from_version:
                self.failed.add(record.from_version)
            self.pointer.write(record.to_version)
            log.warning(
                "[%s] automatic revert from %s (error rate): CURRENT -> %s",
                self.name,
                record.from_version,
                record.to_version,
            )

    # ------------------------------------------------------------------ following CURRENT

    def reconcile(self) -> ReloadRecord | None:
        """Start a reload when ``CURRENT`` (or, with auto-promotion, a newer export) differs."""
        if self.manager.reloading or self.stopping():
            return None
        if self.auto_promote:
            promotion = self._promote_newest()
            if promotion is not None:
                return promotion
        desired = self.pointer.read()
        if desired is None or desired == self.manager.current_version or desired in self.failed:
            return None
        record = self._start(desired, self._after_follow)
        if record is not None:
            log.info(
                "[%s] CURRENT names %s: reloading (reload %s)",
                self.name,
                desired,
                record.reload_id,
            )
        return record

    def _promote_newest(self) -> ReloadRecord | None:
        newest = self.store.newest()
        current = self.pointer.read()
        if newest is None or newest in self.failed or (current is not None and newest <= current):
            return None
        if newest == self.manager.current_version:
            self.pointer.write(newest)
            return None
        record = self._start(newest, self._after_promotion)
        if record is not None:
            log.info("[%s] new export %s: promoting it once it passes a reload", self.name, newest)
        return record

    def _start(self, version: str, on_done: Callable[[ReloadRecord], None]) -> ReloadRecord | None:
        try:
            return self.manager.start_reload(version, on_done=on_done)
        except (ReloadInProgress, NoModelLoaded):
            return None

    def _after_follow(self, record: ReloadRecord) -> None:
        if record.result in _SERVES:
            self.fallback = None
        elif record.requested_version:
            self.failed.add(record.requested_version)  # wait for CURRENT to change again

    def _after_promotion(self, record: ReloadRecord) -> None:
        version = record.requested_version
        if record.result in _SERVES and record.to_version:
            self.pointer.write(record.to_version)
            self.fallback = None
            log.info("[%s] auto-promoted: CURRENT -> %s", self.name, record.to_version)
        elif version:
            self.failed.add(version)
            log.warning(
                "[%s] not promoting %s: it failed here (%s); CURRENT stays %s",
                self.name,
                version,
                (record.error or {}).get("message", record.result),
                self.pointer.read(),
            )

    async def poll(self, stop: asyncio.Event, interval_s: float) -> None:
        """Reconcile every ``interval_s`` until ``stop`` is set (pointers without file events).

        The pointer is read in a worker thread: through fsspec it is a network call, and the
        event loop keeps answering requests meanwhile.
        """
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.reconcile)
            except Exception:  # the follower must survive a store that is briefly unreachable
                log.exception("[%s] reconciling with %s failed", self.name, self.pointer.location)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

    async def watch(self, stop: asyncio.Event, interval_s: float) -> None:
        """Reconcile on every change in the export directory, and every ``interval_s``.

        A ``CURRENT`` that is not a local file (an object store's) sends no events: it is
        polled every ``interval_s`` instead (``poll``).
        """
        if not isinstance(self.pointer, LocalPointer):
            await self.poll(stop, interval_s)
            return
        async for _changes in watchfiles.awatch(
            self.store.root,
            stop_event=stop,
            debounce=50,
            step=20,
            rust_timeout=int(interval_s * 1000),
            yield_on_timeout=True,
            recursive=False,
        ):
            try:
                self.reconcile()
            except Exception:  # the watcher must survive a bad CURRENT or a full disk
                log.exception("[%s] reconciling with %s failed", self.name, self.pointer.location)
