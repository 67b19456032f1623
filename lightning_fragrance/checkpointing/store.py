"""`CheckpointStore`: the directory of checkpoints and its history, committed atomically.

Layout (DESIGN.md §4)::

    checkpoint_step_500.ckpt  checkpoint_step_1000.ckpt  ...  checkpoint_history.json

A sharded checkpoint (`sharded`) is a directory instead, ``checkpoint_step_500/``, committed by
`commit_directory` once every rank wrote its files into ``checkpoint_step_500.tmp/``: rename,
then the history lists every file with its sha256.

Commit protocol: write ``<file>.tmp`` while hashing (`HashingWriter`: sha256 of the bytes as
they are written, no second pass), fsync, rename, then rewrite the history (tmp + fsync +
rename), then apply retention. The history is the truth: a file it does not list is not a
checkpoint. Works on local paths (with fsync of the file and its directory) and on any fsspec
URL (``memory://``, ``s3://``...), where the object store's close/rename provides the atomicity.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from lightning_fragrance.checkpointing.errors import (
    CheckpointCorruptError,
    CheckpointDirectoryError,
    CheckpointError,
)
from lightning_fragrance.checkpointing.hashing_writer import HashingWriter
from lightning_fragrance.checkpointing.records import (
    HISTORY_SCHEMA_VERSION,
    SHARDED_META_FILE,
    CheckpointRecord,
    CheckpointStatus,
    checkpoint_file_name,
    sharded_checkpoint_name,
)

log = logging.getLogger("lightning_fragrance.checkpointing")

HISTORY_FILE = "checkpoint_history.json"
TMP_SUFFIX = ".tmp"
HASH_CHUNK_BYTES = 16 * 1024 * 1024


def file_digest(path: str) -> tuple[str, int]:
    """sha256 and size of a local file, read in chunks (nothing held in memory)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def manifest_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One sha256 for a directory's files (name and digest of each, sorted): the ``sha256`` of
    a sharded entry, so every entry of the history has one."""
    lines = "".join(f"{name}\t{files[name]['sha256']}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


class CheckpointStore:
    """A checkpoint directory with a crash-safe history, sha256 checks and retention.

    Thread-safe: the background writer commits while the training thread lists, pins or loads.

    Args:
        directory: Local path or fsspec URL (``memory://run1/checkpoints``).
        max_checkpoints: Unpinned checkpoints to keep; older ones are deleted after a newer one
            is committed. The newest certified checkpoint and protected steps (a rollback in
            progress) are kept even when they fall outside.
        fs: An fsspec filesystem to use instead of the one inferred from ``directory``
            (``directory`` is then a path on it); handy for tests that inject failures.
        read_only: Never write (non-zero DDP ranks, the ``verify``/``list`` CLI): no sweep, no
            history rewrite, corruption is reported but not recorded.

    Attributes:
        run_id: The run the history belongs to ("" for a history written before run ids, or
            none yet); set by `claim`.
    """

    def __init__(
        self,
        directory: str,
        max_checkpoints: int = 5,
        fs: fsspec.AbstractFileSystem | None = None,
        read_only: bool = False,
    ) -> None:
        if max_checkpoints < 1:
            raise ValueError(f"max_checkpoints={max_checkpoints} must be >= 1")
        if fs is None:
            fs, root = fsspec.core.url_to_fs(str(directory))
        else:
            root = str(directory)
        self.fs: fsspec.AbstractFileSystem = fs
        self.directory = root.rstrip("/") or "/"
        self.max_checkpoints = max_checkpoints
        self.read_only = read_only
        self._local = isinstance(fs, LocalFileSystem)
        self._lock = threading.RLock()
        self._protected: dict[int, int] = {}
        self._entries: list[CheckpointRecord] = []
        self._events: list[dict[str, Any]] = []
        self.run_id = ""
        if not read_only:
            try:
                self.fs.makedirs(self.directory, exist_ok=True)
            except OSError as err:
                raise CheckpointDirectoryError(
                    f"Cannot create the checkpoint directory {self.directory} ({type(err).__name__}"
                    f": {err}). To inspect, export or roll back from existing checkpoints, open it "
                    "read-only: CheckpointStore(..., read_only=True), CheckpointManager(..., "
                    "read_only=True), lf-checkpoints list|verify."
                ) from err
            self._sweep_orphans()
        self.refresh()

    # ------------------------------------------------------------------ paths
    def path(self, file: str) -> str:
        """Full path of a file in the directory (on ``self.fs``)."""
        return f"{self.directory}/{file}"

    @property
    def history_path(self) -> str:
        """Full path of ``checkpoint_history.json``."""
        return self.path(HISTORY_FILE)

    def url(self, file: str) -> str:
        """A path or URL that ``fsspec.open``/``Trainer.fit(ckpt_path=...)`` understand."""
        full = self.path(file)
        return full if self._local else self.fs.unstrip_protocol(full)

    # ------------------------------------------------------------------ history
    def refresh(self) -> None:
        """Reload the history from disk (e.g. on a DDP rank that does not write)."""
        with self._lock:
            if not self.fs.exists(self.history_path):
                self._entries, self._events = [], []
                return
            raw = self.fs.cat_file(self.history_path)
            try:
                doc = json.loads(raw)
            except ValueError as err:
                raise CheckpointError(
                    f"{self.history_path} is not valid JSON ({err}). It is rewritten atomically, "
                    "so this file was edited or copied by hand: restore it, or move it away to "
                    "start a fresh history (checkpoint files are kept)."
                ) from err
            version = int(doc.get("schema_version", 0))
            if version > HISTORY_SCHEMA_VERSION:
                raise CheckpointError(
                    f"{self.history_path} has schema_version {version}, newer than this "
                    f"lightning_fragrance understands ({HISTORY_SCHEMA_VERSION}); upgrade it."
                )
            entries = [CheckpointRecord.from_dict(e) for e in doc.get("entries", [])]
            self._entries = sorted(entries, key=lambda r: r.step)
            self._events = list(doc.get("events", []))
            self.run_id = str(doc.get("run_id", ""))

    # ------------------------------------------------------------------ run identity
    def claim(self, run_id: str, *, resume: bool = False, overwrite: bool = False) -> None:
        """Make the history this run's (writers call it once, before the first save).

        An empty directory, this run's own history, or (with ``resume``) a history written
        before run ids existed is taken as it is. Another run's history is refused, or with
        ``overwrite`` set aside as ``checkpoint_history.<its run id>.json`` (its files are left
        untouched and are no longer checkpoints of this directory).

        Raises:
            CheckpointDirectoryError: Another run's history is here.
        """
        with self._lock:
            self.refresh()
            ours = self.run_id == run_id or (resume and not self.run_id)
            if self._entries and not ours:
                if not overwrite:
                    raise CheckpointDirectoryError(self._foreign_run_message(run_id))
                self._set_aside_history()
            self.run_id = run_id
            for entry in self._entries:
                entry.run_id = entry.run_id or run_id
            try:
                self._write_history()
            except OSError as err:
                raise CheckpointDirectoryError(
                    f"Cannot write {self.history_path} ({type(err).__name__}: {err}). To "
                    "inspect, export or roll back from these checkpoints, open them read-only: "
                    "CheckpointManager(..., read_only=True), lf-checkpoints list|verify."
                ) from err

    def _foreign_run_message(self, run_id: str) -> str:
        steps = [e.step for e in self._entries]
        owner = f"run_id={self.run_id}" if self.run_id else "a run from before run ids"
        newest = self.path(self._entries[-1].file)
        return (
            f"{self.directory} holds the checkpoints of another run ({owner}, steps "
            f"{steps[0]}-{steps[-1]}); this run is {run_id}. Using it would merge the histories, "
            "overwrite same-numbered files and let retention delete this run's checkpoints. "
            "Choose another directory (RollbackCheckpoint's default, dirpath=None, gives each "
            f"run its own under the Trainer's log_dir), resume that run (trainer.fit(model, "
            f"ckpt_path={newest!r}), or CheckpointManager(..., resume=True)), or pass "
            "overwrite=True to start a new history here (the old one is kept as "
            "checkpoint_history.<run id>.<time>.json; its files stay, but are no longer "
            "checkpoints of this directory, and a file of the same step is replaced)."
        )

    def _set_aside_history(self) -> None:
        name = f"checkpoint_history.{self.run_id or 'unnamed'}.{int(time.time())}.json"
        if self.fs.exists(self.history_path):
            self._atomic_write_bytes(name, self.fs.cat_file(self.history_path))
        log.warning(
            "Starting a new history in %s; the previous run's history is kept as %s. Its files "
            "stay but are no longer checkpoints here; a file of the same step is replaced.",
            self.directory,
            name,
        )
        self._entries, self._events = [], []

    def check_writable(self, owner: str) -> None:
        """Fail now, with the path, if this directory cannot be written (a probe file).

        Raises:
            CheckpointDirectoryError: The directory cannot be created or written.
        """
        probe = f".write_probe{TMP_SUFFIX}"
        try:
            self.fs.makedirs(self.directory, exist_ok=True)
            self._atomic_write_bytes(probe, b"")
            self.fs.rm(self.path(probe))
        except OSError as err:
            raise CheckpointDirectoryError(
                f"{owner}: cannot write checkpoints to {self.directory} ({type(err).__name__}: "
                f"{err}). Give it a directory this process can write (dirpath=...), or fix the "
                "permissions; to only inspect or export existing checkpoints, open the store "
                "read-only (lf-checkpoints list/verify)."
            ) from err

    def records(self) -> list[CheckpointRecord]:
        """Committed checkpoints, oldest first (copies: mutate through the store's methods)."""
        with self._lock:
            return [CheckpointRecord.from_dict(r.to_dict()) for r in self._entries]

    def record(self, step: int) -> CheckpointRecord | None:
        """The committed checkpoint of ``step``, if any."""
        with self._lock:
            for entry in self._entries:
                if entry.step == step:
                    return CheckpointRecord.from_dict(entry.to_dict())
        return None

    def events(self) -> list[dict[str, Any]]:
        """Recorded events (rollbacks, dry-run triggers), oldest first."""
        with self._lock:
            return [dict(e) for e in self._events]

    def add_event(self, event: Mapping[str, Any]) -> None:
        """Append an event (JSON-safe values) and rewrite the history."""
        with self._lock:
            self._events.append(json.loads(json.dumps(dict(event))))
            self._write_history()

    def set_status(
        self,
        step: int,
        status: str | CheckpointStatus,
        *,
        evidence: Mapping[str, float] | None = None,
        note: str = "",
    ) -> None:
        """Change a committed checkpoint's status (certified, corrupt, rejected), with the
        evidence that certified it or the note that says why it was rejected."""
        value = CheckpointStatus(status).value
        with self._lock:
            matches = [e for e in self._entries if e.step == step]
            if not matches:  # its write failed, or retention already removed it
                log.debug("set_status(%d, %s): no committed checkpoint at that step", step, value)
                return
            entry = matches[0]
            new_evidence = dict(evidence) if evidence is not None else entry.evidence
            changed = (entry.status, entry.evidence, entry.note) != (value, new_evidence, note)
            if changed:
                entry.status, entry.evidence = value, new_evidence
                entry.note = note or entry.note
                self._write_history()

    def pin(self, step: int) -> CheckpointRecord:
        """Keep the checkpoint of ``step`` forever (it no longer counts toward retention)."""
        return self._set_pinned(step, True)

    def unpin(self, step: int) -> CheckpointRecord:
        """Undo `pin`; retention may delete it at the next commit."""
        return self._set_pinned(step, False)

    def _set_pinned(self, step: int, pinned: bool) -> CheckpointRecord:
        if self.read_only:
            raise CheckpointError(
                f"Store {self.directory} was opened read-only; cannot change the pin of step {step}"
            )
        with self._lock:
            entry = self._find(step)
            entry.pinned = pinned
            self._write_history()
            return CheckpointRecord.from_dict(entry.to_dict())

    def _find(self, step: int) -> CheckpointRecord:
        for entry in self._entries:
            if entry.step == step:
                return entry
        steps = [e.step for e in self._entries]
        raise CheckpointError(
            f"No committed checkpoint at step {step} in {self.history_path}; committed steps: "
            f"{steps}"
        )

    def _write_history(self) -> None:
        if self.read_only:
            return
        doc = {
            "schema_version": HISTORY_SCHEMA_VERSION,
            "run_id": self.run_id,
            "entries": [e.to_dict() for e in self._entries],
            "events": self._events,
        }
        data = json.dumps(doc, indent=2, allow_nan=True).encode()
        self._atomic_write_bytes(HISTORY_FILE, data)

    # ------------------------------------------------------------------ writing
    def _list(self, record: CheckpointRecord) -> None:
        """The commit point of every checkpoint: ``record`` (its files already in place)
        replaces any entry of its step in the history, then retention runs."""
        with self._lock:
            self._entries = [e for e in self._entries if e.step != record.step]
            self._entries.append(record)
            self._entries.sort(key=lambda r: r.step)
            self._write_history()
            self._apply_retention()

    def commit(
        self,
        step: int,
        payload: Mapping[str, Any],
        metrics: Mapping[str, float],
        status: str | CheckpointStatus = CheckpointStatus.PENDING,
        *,
        run_id: str = "",
        initial: bool = False,
    ) -> CheckpointRecord:
        """Write ``payload`` as the checkpoint of ``step`` and make it part of the history.

        Order: tmp file (hashed while written) → fsync → rename → history → retention. A crash
        at any point leaves the previous history and every file it names intact.
        """
        if self.read_only:
            raise CheckpointError(
                f"Store {self.directory} was opened read-only; cannot commit step {step} (open it "
                "writable, or save to another directory)."
            )
        file = checkpoint_file_name(step)
        with self._lock:
            self._protect_add(step)
        try:
            sha, nbytes = self._write_payload(file, payload)
            record = CheckpointRecord(
                step=step,
                file=file,
                sha256=sha,
                bytes=nbytes,
                created_at=time.time(),
                metrics={str(k): float(v) for k, v in metrics.items()},
                status=CheckpointStatus(status).value,
                run_id=run_id or self.run_id,
                initial=initial,
            )
            self._list(record)
        finally:
            with self._lock:
                self._protect_remove(step)
        return CheckpointRecord.from_dict(record.to_dict())

    # ------------------------------------------------------------------ sharded writing
    def staging_directory(self, step: int) -> str:
        """Local path of the directory the ranks write the shards of ``step`` into.

        Raises:
            CheckpointError: The store is not on a local (or shared, POSIX-mounted) filesystem:
                `torch.distributed.checkpoint`'s file writer needs one.
        """
        if not self._local:
            raise CheckpointError(
                f"Sharded checkpoints need a local or shared filesystem path; {self.directory} "
                f"is on {type(self.fs).__name__}. Save them to a mounted path (and copy them to "
                "the object store afterwards), or train with a strategy that saves one file."
            )
        return self.path(sharded_checkpoint_name(step) + TMP_SUFFIX)

    def prepare_staging(self, step: int) -> str:
        """Create an empty staging directory for ``step`` (one process: the writer)."""
        staging = self.staging_directory(step)
        shutil.rmtree(staging, ignore_errors=True)  # the rest of an earlier, failed attempt
        os.makedirs(staging)
        return staging

    def discard_staging(self, step: int) -> None:
        """Delete the staging directory of ``step``: its write failed, nothing is listed."""
        shutil.rmtree(self.staging_directory(step), ignore_errors=True)

    def commit_directory(
        self,
        step: int,
        files: Mapping[str, Mapping[str, Any]],
        metrics: Mapping[str, float],
        status: str | CheckpointStatus = CheckpointStatus.PENDING,
        *,
        run_id: str = "",
        initial: bool = False,
    ) -> CheckpointRecord:
        """Publish the staging directory of ``step``, every rank's files written and hashed.

        ``files`` must name every file of the directory with its sha256 and size (they were
        hashed by the rank that wrote them). Order: fsync the files' directory, rename it to
        its final name, fsync the parent, then the history, then retention: a crash before the
        history leaves an unlisted directory, never a listed one that is incomplete.

        Raises:
            CheckpointError: Read-only store, or the directory holds files ``files`` does not
                name (or lacks some it names).
        """
        if self.read_only:
            raise CheckpointError(
                f"Store {self.directory} was opened read-only; cannot commit step {step}."
            )
        staging = self.staging_directory(step)
        name = sharded_checkpoint_name(step)
        present = set(os.listdir(staging))
        if present != set(files):
            raise CheckpointError(
                f"{staging}: the ranks reported {sorted(files)} but the directory holds "
                f"{sorted(present)}; not committed."
            )
        with self._lock:
            self._protect_add(step)
        try:
            _fsync_path(staging)
            final = self.path(name)
            shutil.rmtree(final, ignore_errors=True)  # an unlisted leftover of a crash
            os.replace(staging, final)
            self._fsync_directory()
            listed: dict[str, dict[str, Any]] = {
                n: {"sha256": str(d["sha256"]), "bytes": int(d["bytes"])} for n, d in files.items()
            }
            record = CheckpointRecord(
                step=step,
                file=name,
                sha256=manifest_digest(listed),
                bytes=sum(int(d["bytes"]) for d in listed.values()),
                created_at=time.time(),
                metrics={str(k): float(v) for k, v in metrics.items()},
                status=CheckpointStatus(status).value,
                run_id=run_id or self.run_id,
                initial=initial,
                sharded=True,
                files=listed,
            )
            self._list(record)
        finally:
            with self._lock:
                self._protect_remove(step)
        return CheckpointRecord.from_dict(record.to_dict())

    def _write_payload(self, file: str, payload: Mapping[str, Any]) -> tuple[str, int]:
        tmp, final = self.path(file + TMP_SUFFIX), self.path(file)
        try:
            with self._open_durable(tmp) as handle:
                writer = HashingWriter(handle, handle.fileno() if self._local else None)
                try:
                    torch.save(payload, writer)  # type: ignore[arg-type]
                finally:
                    writer.close()
            self._rename(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise
        return writer.hexdigest(), writer.nbytes

    def _atomic_write_bytes(self, file: str, data: bytes) -> None:
        tmp, final = self.path(file + TMP_SUFFIX), self.path(file)
        try:
            with self._open_durable(tmp) as handle:
                handle.write(data)
            self._rename(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise

    @contextlib.contextmanager
    def _open_durable(self, path: str) -> Iterator[IO[bytes]]:
        """Open for writing; on success the bytes are on stable storage when the block exits."""
        if self._local:
            # Plain open + fsync: fsspec's local writer stages in $TMPDIR and never fsyncs
            # (research note §1.3), which is neither atomic across filesystems nor durable.
            with open(path, "wb", buffering=8 * 1024 * 1024) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        else:
            with self.fs.open(path, "wb") as handle:
                yield handle

    def _rename(self, src: str, dst: str) -> None:
        if self._local:
            os.replace(src, dst)
            self._fsync_directory()
        else:
            self.fs.mv(src, dst)

    def _fsync_directory(self) -> None:
        # Makes the rename itself durable (POSIX); not every platform can open a directory.
        with contextlib.suppress(OSError):
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _sweep_orphans(self) -> None:
        """Delete ``*.tmp`` left by a crash mid-write: never part of the history."""
        try:
            names = self.fs.ls(self.directory, detail=False)
        except FileNotFoundError:
            return
        for name in names:
            if str(name).endswith(TMP_SUFFIX):
                log.info("Removing orphan temporary file %s left by an interrupted write", name)
                try:
                    # recursive: a sharded save stages a directory
                    self.fs.rm(name, recursive=self.fs.isdir(name))
                except FileNotFoundError:
                    pass
                except OSError as err:  # a read-only filesystem: it is never read anyway
                    log.warning(
                        "Cannot remove the orphan %s (%s); it is not a checkpoint and is ignored.",
                        name,
                        err,
                    )

    # ------------------------------------------------------------------ retention
    @contextlib.contextmanager
    def protect(self, step: int) -> Iterator[None]:
        """Keep the checkpoint of ``step`` out of retention while the block runs (a rollback
        that is loading it)."""
        with self._lock:
            self._protect_add(step)
        try:
            yield
        finally:
            with self._lock:
                self._protect_remove(step)

    def _protect_add(self, step: int) -> None:
        self._protected[step] = self._protected.get(step, 0) + 1

    def _protect_remove(self, step: int) -> None:
        count = self._protected.get(step, 0) - 1
        if count <= 0:
            self._protected.pop(step, None)
        else:
            self._protected[step] = count

    def retention_victims(self) -> list[CheckpointRecord]:
        """Checkpoints retention would delete now (pure choice, no I/O).

        Keeps the newest ``max_checkpoints`` unpinned ones; pinned ones do not count. The newest
        certified checkpoint and protected steps are kept even outside that window.
        """
        with self._lock:
            unpinned = [e for e in self._entries if not e.pinned]
            keep = {e.step for e in unpinned[-self.max_checkpoints :]}
            certified = [e for e in self._entries if e.status == CheckpointStatus.CERTIFIED.value]
            if certified:
                keep.add(certified[-1].step)
            keep.update(self._protected)
            return [e for e in unpinned if e.step not in keep]

    def _apply_retention(self) -> None:
        victims = self.retention_victims()
        if not victims:
            return
        steps = {v.step for v in victims}
        # History first: a crash between the two leaves an unlisted file, never a listed
        # file that is gone.
        self._entries = [e for e in self._entries if e.step not in steps]
        self._write_history()
        for victim in victims:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(victim.file), recursive=victim.sharded)
            log.debug("Retention removed %s", victim.file)

    # ------------------------------------------------------------------ reading
    def verify(self, record: CheckpointRecord) -> bool:
        """Whether the file (every file of a sharded one) exists and matches its recorded
        sha256 and size."""
        try:
            if record.sharded:
                self.verify_files(record)
            else:
                self._read_verified(record)
        except CheckpointCorruptError:
            return False
        return True

    def verify_files(self, record: CheckpointRecord, names: Iterable[str] | None = None) -> None:
        """Check files of a sharded checkpoint against the history (default: all of them).

        Raises:
            CheckpointCorruptError: A file is missing, or its sha256 or size differ.
        """
        if not record.sharded or not record.files:
            raise CheckpointCorruptError(
                f"{record.file} (step {record.step}) has no per-file digests in {HISTORY_FILE}"
            )
        for name in sorted(record.files if names is None else names):
            expected = record.files[name]
            where = f"{record.file}/{name} (step {record.step})"
            try:
                digest, size = file_digest(self.path(f"{record.file}/{name}"))
            except FileNotFoundError as err:
                raise CheckpointCorruptError(
                    f"{where} is listed in {HISTORY_FILE} but missing"
                ) from err
            if digest != expected["sha256"] or size != expected["bytes"]:
                raise CheckpointCorruptError(
                    f"{where} failed its integrity check: sha256 {digest[:12]}... with {size} "
                    f"bytes, history expects {str(expected['sha256'])[:12]}... with "
                    f"{expected['bytes']} bytes (truncated or bit-flipped)"
                )

    def _read_verified(self, record: CheckpointRecord) -> bytes:
        path = self.path(record.file)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError as err:
            raise CheckpointCorruptError(
                f"{record.file} (step {record.step}) is listed in {HISTORY_FILE} but missing"
            ) from err
        self._check_digest(record, hashlib.sha256(data).hexdigest(), len(data))
        return data

    def _verify_streaming(self, record: CheckpointRecord) -> None:
        """`_read_verified` for a local file, in chunks (nothing held in memory)."""
        digest, size = hashlib.sha256(), 0
        try:
            with open(self.path(record.file), "rb") as handle:
                while chunk := handle.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError as err:
            raise CheckpointCorruptError(
                f"{record.file} (step {record.step}) is listed in {HISTORY_FILE} but missing"
            ) from err
        self._check_digest(record, digest.hexdigest(), size)

    def _check_digest(self, record: CheckpointRecord, digest: str, size: int) -> None:
        if digest != record.sha256 or size != record.bytes:
            raise CheckpointCorruptError(
                f"{record.file} (step {record.step}) failed its integrity check: sha256 "
                f"{digest[:12]}... with {size} bytes, history expects "
                f"{record.sha256[:12]}... with {record.bytes} bytes (truncated or bit-flipped)"
            )

    def load(self, record: CheckpointRecord) -> dict[str, Any]:
        """Verify the sha256, then ``torch.load(weights_only=True)`` onto the CPU.

        Raises:
            CheckpointCorruptError: The file is missing, truncated, bit-flipped or unreadable;
                the entry is marked ``corrupt`` in the history (unless read-only).
        """
        if record.sharded:
            raise CheckpointError(
                f"{record.file} (step {record.step}) is sharded: every rank loads its shard "
                "collectively (ShardedCheckpointer.load), never one process alone."
            )
        with self.protect(record.step):
            try:
                return self._read_safely(record)
            except CheckpointCorruptError as err:
                self._mark_corrupt(record.step, str(err))
                raise

    def check(self, record: CheckpointRecord) -> str | None:
        """What `load` would refuse in this file (sha256, then the safe load), or None when it
        loads. Records nothing: for ``lf-checkpoints verify`` and other read-only callers."""
        try:
            if record.sharded:
                self._check_sharded(record)
            else:
                self._read_safely(record)
        except CheckpointCorruptError as err:
            return str(err)
        return None

    def _check_sharded(self, record: CheckpointRecord) -> None:
        """Every file's sha256, then the one part torch.load reads (``meta.pt``), safely.
        DCP's ``.metadata`` is a pickle: it is only ever read after its sha256 matched."""
        self.verify_files(record)
        meta = SHARDED_META_FILE
        if meta not in record.files:
            return
        try:
            torch.load(self.path(f"{record.file}/{meta}"), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointCorruptError(
                f"{record.file}/{meta} (step {record.step}) matches its sha256 but cannot be "
                f"loaded with torch.load(weights_only=True): {type(err).__name__}: {err}"[:600]
            ) from err

    def _read_safely(self, record: CheckpointRecord) -> dict[str, Any]:
        if self._local:
            # Hashed as a stream, then memory-mapped: the bytes and the tensors built from them
            # would be two transient copies of the state (issue 12 item 4: the guard's host
            # memory is one copy). Files are replaced by rename, never rewritten in place, so
            # the verified file is the one mapped.
            self._verify_streaming(record)
            source: Any = self.path(record.file)
        else:
            source = io.BytesIO(self._read_verified(record))
        try:
            # weights_only: a file whose sha256 matches may still hold a pickle payload (the
            # history can be written by anyone with write access); never unpickle objects.
            loaded = torch.load(
                source, map_location="cpu", weights_only=True, mmap=True if self._local else None
            )
        except Exception as err:
            raise CheckpointCorruptError(
                f"{record.file} (step {record.step}) matches its sha256 but cannot be loaded "
                f"with torch.load(weights_only=True): {type(err).__name__}: {err}"[:600]
            ) from err
        if not isinstance(loaded, dict):
            raise CheckpointCorruptError(f"{record.file} does not hold a checkpoint dict")
        return loaded

    def mark_corrupt(self, step: int, why: str) -> None:
        """Record that the checkpoint of ``step`` failed its check (``why``) in the history."""
        self._mark_corrupt(step, why)

    def _mark_corrupt(self, step: int, why: str) -> None:
        with self._lock:
            for entry in self._entries:
                if entry.step == step:
                    entry.status = CheckpointStatus.CORRUPT.value
                    entry.note = why
                    self._write_history()

    def steps(self) -> Iterable[int]:
        """Committed steps, oldest first."""
        return [r.step for r in self.records()]


def _fsync_path(directory: str) -> None:
    """fsync every file of ``directory`` and the directory itself (POSIX; best effort where a
    platform cannot open a directory). DCP fsyncs its shards; ``meta.pt`` and the entries of the
    directory are made durable here, before the rename publishes them."""
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
