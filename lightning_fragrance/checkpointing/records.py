"""Plain records the engine passes around: checkpoint entries, reasons, decisions.

Statuses and reasons are `str` Enums in code; only their string values reach files, because
everything stored must load with `torch.load(weights_only=True)` (DESIGN.md §4).
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, NamedTuple

HISTORY_SCHEMA_VERSION = 1
"""Version of `checkpoint_history.json`; bumped when the layout of an entry changes."""


class CheckpointStatus(str, Enum):
    """Life cycle of a committed checkpoint.

    ``pending`` until it has been followed by ``certify_after_steps`` healthy steps, then
    ``certified``. ``corrupt`` when its file failed the sha256 check. ``rejected`` when a trigger
    fired before it was certified: it may hold the onset of the divergence, so it is never a
    rollback target again (it stays on disk for forensics until retention removes it).
    """

    PENDING = "pending"
    CERTIFIED = "certified"
    CORRUPT = "corrupt"
    REJECTED = "rejected"


# Plain strings for the per-step paths: an Enum member's `.value` costs a descriptor call.
PENDING = CheckpointStatus.PENDING.value
CERTIFIED = CheckpointStatus.CERTIFIED.value
_TARGET_STATUSES = frozenset({PENDING, CERTIFIED})


@dataclasses.dataclass
class CheckpointRecord:
    """One committed checkpoint as listed in `checkpoint_history.json`.

    Attributes:
        step: Optimizer step (``global_step``) the state was taken at.
        file: File name relative to the checkpoint directory.
        sha256: Hex digest of the file's bytes, computed while writing.
        bytes: Size of the file.
        created_at: Unix time of the commit.
        metrics: Training metrics at that step (loss, reward, kl_divergence, ...).
        status: One of the `CheckpointStatus` values.
        pinned: Pinned checkpoints are never deleted and do not count toward retention.
    """

    step: int
    file: str
    sha256: str = ""
    bytes: int = 0
    created_at: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    status: str = CheckpointStatus.PENDING.value
    pinned: bool = False

    @property
    def is_rollback_target(self) -> bool:
        """Whether this checkpoint may still be restored (not corrupt, not rejected)."""
        return self.status in _TARGET_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """JSON- and weights_only-safe representation."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointRecord:
        """Inverse of `to_dict`; unknown keys (newer schema) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["step"] = int(kwargs["step"])
        kwargs["metrics"] = {str(k): float(v) for k, v in dict(kwargs.get("metrics", {})).items()}
        return cls(**kwargs)


class RollbackDecision(NamedTuple):
    """Result of `CheckpointManager.check_rollback`; unpacks like the guide's tuple.

    Attributes:
        should_rollback: True when the step is judged divergent (also in dry-run mode).
        checkpoint: The checkpoint a rollback would restore, if any is available.
        reason: A `RollbackReason` value, or None when healthy.
    """

    should_rollback: bool
    checkpoint: CheckpointRecord | None
    reason: str | None


def checkpoint_file_name(step: int) -> str:
    """The file name of the checkpoint taken at ``step`` (DESIGN.md §4)."""
    return f"checkpoint_step_{step}.ckpt"
