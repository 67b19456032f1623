"""Sharded checkpoints: each rank saves and restores its own shard with DCP.

DCP is ``torch.distributed.checkpoint``. Under FSDP2 (``fully_shard``, Lightning's
``ModelParallelStrategy``) every rank holds one slice of each weight and optimizer moment.
`ShardedCheckpointer` saves them as DCP does (each rank its own ``__<rank>_0.distcp``, rank 0
DCP's ``.metadata`` and the small rest in ``meta.pt``: the directory Lightning itself writes,
so ``fit(ckpt_path=<dir>)`` resumes it) and adds what the guard's single-file checkpoints have:
the history lists the directory only after every rank wrote and hashed its files (the digests
are all-gathered to rank 0, which commits), and every file's sha256 is checked before anything
reads it. No rank ever holds the full state: DCP writes and reads each rank's local chunks,
and a rollback loads them in place.

DCP's ``.metadata`` is a pickle that ``dcp.load`` reads with the full unpickler (``meta.pt`` is
read with ``torch.load(weights_only=True)``): both are read only after their sha256 matched the
history, on every rank that reads them.

Every public method of `ShardedCheckpointer` is collective: all ranks call it together and all
get the same answer (a failure on one rank is a failure on every rank, never a hang). No
Lightning import: the adapter lends a `ShardedStateProvider`; the collectives default to
torch.distributed's default process group.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.storage import StorageWriter

from lightning_fragrance.checkpointing.errors import (
    CheckpointCorruptError,
    CheckpointError,
    ShardedWriteError,
)
from lightning_fragrance.checkpointing.records import (
    SHARDED_META_FILE,
    CheckpointRecord,
    CheckpointStatus,
)
from lightning_fragrance.checkpointing.store import HISTORY_FILE, CheckpointStore, file_digest

MODEL_KEYS = ("state_dict", "model")
"""Where the weights sit in a sharded checkpoint: ``state_dict`` (ModelParallelStrategy, and
ours) or ``model`` (FSDPStrategy with ``state_dict_type="sharded"``)."""

_OWNED = re.compile(r"^__(\d+)_")
# DCP's CheckpointException derives from BaseException (not Exception): caught by name below.


class ShardedState(NamedTuple):
    """What one rank saves.

    Attributes:
        sharded: The state DCP writes, each rank its own chunks (DTensor-valued state dicts:
            ``{"state_dict": model, "optimizer_0": optimizer, ...}``).
        extra: The small rest (loops, callbacks, schedulers, RNG); rank 0 writes it to
            ``meta.pt``.
    """

    sharded: dict[str, Any]
    extra: dict[str, Any]


@runtime_checkable
class ShardedStateProvider(Protocol):
    """What a driver lends for a sharded run (the sharded form of `StateProvider`)."""

    def capture_sharded(self) -> ShardedState:
        """This rank's state to save now (live tensors: DCP writes them synchronously)."""
        ...

    def load_targets(self) -> dict[str, Any]:
        """The live state dicts, keyed as in `capture_sharded`, that ``dcp.load`` fills."""
        ...

    def restore_sharded(self, loaded: dict[str, Any], extra: Mapping[str, Any]) -> None:
        """Apply the filled `load_targets` and the saved ``extra`` to the live objects."""
        ...

    def parameters(self) -> Iterable[torch.Tensor]:
        """This rank's local shards of the weights (checked for NaN/Inf before each save)."""
        ...


class Collectives(Protocol):
    """The one collective the protocol needs, on the group of the sharded model."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        ...


class TorchCollectives:
    """torch.distributed's default process group (the one the strategy initialised)."""

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def describe_failure(error: BaseException, rank: int) -> str:
    """``rank N: OSError: ...`` for each failing rank; DCP's CheckpointException carries every
    rank's own exception (its message is a traceback)."""
    if isinstance(error, CheckpointException):
        parts = []
        for failed, wrapped in sorted(error.failures.items()):
            # each failure is DCP's (exception, stack summary) pair
            cause = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            parts.append(f"rank {failed}: {describe_exception(cause)}")
        return "; ".join(parts)
    return f"rank {rank}: {describe_exception(error)}"


def describe_exception(error: BaseException) -> str:
    """One line: the type and message, bounded."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def default_storage_writer(path: str) -> StorageWriter:
    """One file per rank (Lightning's layout), fsynced before ``dcp.save`` returns."""
    return dcp.FileSystemWriter(path, single_file_per_rank=True, sync_files=True)


def owner_rank(name: str) -> int | None:
    """The rank that wrote ``name`` (``__1_0.distcp`` -> 1), None for the shared files."""
    match = _OWNED.match(name)
    return int(match.group(1)) if match else None


class ShardedCheckpointer:
    """Collective save, check and load of sharded checkpoints in a `CheckpointStore`.

    Args:
        store: The checkpoint directory (writable on rank 0, read-only elsewhere); a local or
            shared filesystem path.
        collectives: Rank, world size and all-gather (default: torch.distributed).
        storage_writer: Builds DCP's writer for a directory (default: `default_storage_writer`);
            tests hand in one that fails, as a full disk would.
    """

    def __init__(
        self,
        store: CheckpointStore,
        collectives: Collectives | None = None,
        *,
        storage_writer: Callable[[str], StorageWriter] = default_storage_writer,
    ) -> None:
        self.store = store
        self.collectives: Collectives = collectives or TorchCollectives()
        self.storage_writer = storage_writer

    @property
    def rank(self) -> int:
        return self.collectives.rank

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        state: ShardedState,
        metrics: Mapping[str, float],
        status: str | CheckpointStatus = CheckpointStatus.PENDING,
        *,
        run_id: str = "",
        initial: bool = False,
    ) -> CheckpointRecord:
        """Write every rank's shard of ``step``, then (rank 0) commit once all are hashed.

        Raises:
            ShardedWriteError: On every rank, when any rank failed; the staging directory is
                removed and the history does not list the step.
        """
        failures = self._prepare(step)
        digests: dict[str, dict[str, Any]] = {}
        if not failures:
            staging = self.store.staging_directory(step)
            failure: str | None = None
            try:
                dcp.save(state.sharded, storage_writer=self.storage_writer(staging))
                if self.rank == 0:
                    torch.save(state.extra, os.path.join(staging, SHARDED_META_FILE))
                digests = self._own_digests(staging)
            except (Exception, CheckpointException) as err:  # reported to every rank below
                failure = describe_failure(err, self.rank)
            reports = self.collectives.all_gather_object((failure, digests))
            # dict.fromkeys: DCP raises the same failure on every rank; name it once
            failures = list(dict.fromkeys(f for f, _ in reports if f))
            for _, files in reports:
                digests.update(files)
        outcome: Any = failures
        if self.rank == 0:
            outcome = self._commit(step, digests, failures, metrics, status, run_id, initial)
        agreed = self.collectives.all_gather_object(outcome)[0]
        if isinstance(agreed, list):
            raise ShardedWriteError(
                f"The sharded checkpoint of step {step} was not committed ({'; '.join(agreed)}); "
                f"its directory was removed and {HISTORY_FILE} does not list it. Training "
                "continues from the live state; the next save tries again."
            )
        return CheckpointRecord.from_dict(agreed)

    def _prepare(self, step: int) -> list[str]:
        """Rank 0 creates an empty staging directory; every rank learns whether it could."""
        failure: str | None = None
        if self.rank == 0:
            try:
                self.store.prepare_staging(step)
            except (OSError, CheckpointError) as err:
                failure = f"rank 0: cannot create the staging directory: {err}"
        return [f for f in self.collectives.all_gather_object(failure) if f]

    def _own_digests(self, staging: str) -> dict[str, dict[str, Any]]:
        """sha256 and size of the files this rank wrote (rank 0: also the shared ones)."""
        digests: dict[str, dict[str, Any]] = {}
        for name in sorted(os.listdir(staging)):
            owner = owner_rank(name)
            if owner == self.rank or (owner is None and self.rank == 0):
                sha, size = file_digest(os.path.join(staging, name))
                digests[name] = {"sha256": sha, "bytes": size}
        return digests

    def _commit(
        self,
        step: int,
        digests: Mapping[str, Mapping[str, Any]],
        failures: list[str],
        metrics: Mapping[str, float],
        status: str | CheckpointStatus,
        run_id: str,
        initial: bool,
    ) -> dict[str, Any] | list[str]:
        """Rank 0: the committed record, or the failures (the staging directory removed)."""
        if not failures:
            try:
                record = self.store.commit_directory(
                    step, digests, metrics, status, run_id=run_id, initial=initial
                )
            except Exception as err:
                failures = [f"rank 0: commit failed: {type(err).__name__}: {err}"[:600]]
            else:
                return record.to_dict()
        with contextlib.suppress(Exception):  # rank 0 must reach the all-gather whatever happens
            self.store.discard_staging(step)
        return failures

    # ------------------------------------------------------------------ check and load
    def check(self, record: CheckpointRecord) -> str | None:
        """What makes ``record`` unloadable, agreed by every rank (None: intact).

        Each rank hashes the files it reads: its own shard (a shard of a larger world goes to
        rank ``owner % world_size``) and the shared ``.metadata``/``meta.pt`` it unpickles.
        """
        problem: str | None = None
        try:
            if not record.sharded:
                raise CheckpointCorruptError(f"{record.file} is not a sharded checkpoint")
            self.store.verify_files(record, [n for n in record.files if self._reads(n)])
        except CheckpointCorruptError as err:
            problem = str(err)
        problems = [p for p in self.collectives.all_gather_object(problem) if p]
        return problems[0] if problems else None

    def _reads(self, name: str) -> bool:
        owner = owner_rank(name)
        return owner is None or owner % self.collectives.world_size == self.rank

    def load(self, record: CheckpointRecord, provider: ShardedStateProvider) -> None:
        """Restore ``record`` into the live sharded state of every rank, in place.

        The sha256 of every file is checked first (`check`): nothing is unpickled before.

        Raises:
            CheckpointCorruptError: On every rank: a file failed its check, ``meta.pt`` did not
                load with ``weights_only=True``, or ``dcp.load`` failed.
        """
        problem = self.check(record)
        if problem is not None:
            raise CheckpointCorruptError(problem)
        directory = self.store.path(record.file)
        extra: dict[str, Any] = {}
        failure: str | None = None
        try:
            if SHARDED_META_FILE in record.files:
                extra = torch.load(
                    os.path.join(directory, SHARDED_META_FILE),
                    map_location="cpu",
                    weights_only=True,
                )
        except Exception as err:
            failure = f"{record.file}/{SHARDED_META_FILE}: {type(err).__name__}: {err}"[:600]
        failures = [f for f in self.collectives.all_gather_object(failure) if f]
        if failures:
            raise CheckpointCorruptError(
                f"{failures[0]} (it matches its sha256 but does not load with "
                "torch.load(weights_only=True))"
            )
        targets = provider.load_targets()
        try:
            dcp.load(targets, storage_reader=dcp.FileSystemReader(directory))
        except (Exception, CheckpointException) as err:  # DCP raises it on every rank
            raise CheckpointCorruptError(
                f"{record.file} (step {record.step}) matches its sha256 but dcp.load failed: "
                f"{describe_failure(err, self.rank)}"
            ) from err
        provider.restore_sharded(targets, extra)

    def first_bad(self, index: int | None) -> int | None:
        """The smallest of every rank's first non-finite shard index: each rank sees only its
        own shards, and all must refuse the save together."""
        found = [i for i in self.collectives.all_gather_object(index) if i is not None]
        return min(found) if found else None


# ---------------------------------------------------------------------- offline (no ranks)
def consolidate_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The full checkpoint dict of a sharded checkpoint directory, in one process, no ranks.

    The history beside the directory must list it, and every file must match its sha256
    before anything is read (``.metadata`` is a pickle). The weights are assembled from every
    rank's shard into plain tensors (``state_dict``); optimizer states are not read.

    Raises:
        CheckpointError: No history lists the directory (nothing to verify against).
        CheckpointCorruptError: A file is missing or differs from the history.
    """
    path = os.path.abspath(os.fspath(directory)).rstrip("/")
    parent, name = os.path.split(path)
    store = CheckpointStore(parent, read_only=True)
    record = next((r for r in store.records() if r.file == name and r.sharded), None)
    if record is None:
        raise CheckpointError(
            f"{path} is not listed as a sharded checkpoint in {parent}/{HISTORY_FILE}: without "
            "its sha256s it is not read (its .metadata is a pickle). Export a checkpoint from "
            "a directory the guard wrote, or convert this one with trusted code "
            "(torch.distributed.checkpoint.format_utils.dcp_to_torch_save)."
        )
    store.verify_files(record)
    # Verified: only now is anything unpickled.
    extra: dict[str, Any] = {}
    if SHARDED_META_FILE in record.files:
        extra = torch.load(
            os.path.join(path, SHARDED_META_FILE), map_location="cpu", weights_only=True
        )
    reader = dcp.FileSystemReader(path)
    metadata = reader.read_metadata()
    tensors = metadata.state_dict_metadata
    key = next((k for k in MODEL_KEYS if any(n.startswith(k + ".") for n in tensors)), None)
    if key is None:
        raise CheckpointError(f"{path} holds no weights under {' or '.join(MODEL_KEYS)}")
    weights = {
        fqn[len(key) + 1 :]: torch.empty(tuple(info.size), dtype=info.properties.dtype)
        for fqn, info in tensors.items()
        if fqn.startswith(key + ".") and isinstance(info, TensorStorageMetadata)
    }
    dcp.load({key: weights}, storage_reader=reader, no_dist=True)
    return {**extra, "state_dict": weights}
