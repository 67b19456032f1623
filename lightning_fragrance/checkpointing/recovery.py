"""Finding the state to restore: the in-memory snapshot first, then intact files, oldest last.

The in-memory snapshot is the fast path (no disk read, no collective under DDP, research note
§7.1); the file is the durable fallback. A file that fails its sha256 is marked corrupt and the
next older candidate is tried.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_fragrance.checkpointing.errors import CheckpointCorruptError, NoGoodCheckpointError
from lightning_fragrance.checkpointing.records import CheckpointRecord
from lightning_fragrance.checkpointing.store import CheckpointStore

log = logging.getLogger("lightning_fragrance.checkpointing")


@dataclasses.dataclass
class Snapshot:
    """A staged (CPU, never aliased) copy of the training state at ``step``.

    Treat ``payload`` as read-only: the background writer may be serialising it, and later
    rollbacks reuse it. Load optimizer states from a deep copy (`torch.optim.Optimizer`
    aliases same-device tensors on load, research note §6.1).
    """

    step: int
    payload: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class RestoreSource:
    """The state chosen for a rollback."""

    record: CheckpointRecord
    payload: Mapping[str, Any]
    from_memory: bool
    skipped: tuple[str, ...] = ()


def find_restore_source(
    candidates: Sequence[CheckpointRecord],
    snapshot: Snapshot | None,
    store: CheckpointStore | None,
    on_corrupt: Callable[[CheckpointRecord, CheckpointCorruptError], None],
) -> RestoreSource:
    """The first candidate whose state is available and intact.

    Args:
        candidates: Targets in preference order (`RollbackGuard.candidates`).
        snapshot: The in-memory snapshot, used when its step matches a candidate.
        store: Where files are read from (None: memory only).
        on_corrupt: Called for each candidate whose file failed verification.

    Raises:
        NoGoodCheckpointError: No candidate is left; the message lists what was tried.
    """
    skipped: list[str] = []
    for record in candidates:
        if snapshot is not None and snapshot.step == record.step:
            committed = store.record(record.step) if store is not None else None
            return RestoreSource(committed or record, snapshot.payload, True, tuple(skipped))
        if store is None:
            skipped.append(f"{record.file}: not in memory and no store")
            continue
        stored = store.record(record.step)
        if stored is None:
            skipped.append(f"{record.file}: not committed (write failed or removed)")
            continue
        try:
            payload = store.load(stored)
        except CheckpointCorruptError as err:
            on_corrupt(record, err)
            skipped.append(str(err))
            continue
        return RestoreSource(stored, payload, False, tuple(skipped))
    tried = "; ".join(skipped) if skipped else "no checkpoint has been saved yet"
    raise NoGoodCheckpointError(
        f"No intact checkpoint to roll back to ({tried}). Training cannot recover by itself: "
        "resume by hand from an older copy, or restart the run."
    )
