"""Plain records the engine passes around: checkpoint entries, reasons, decisions.

Statuses and reasons are `str` Enums in code; only their string values reach files, because
everything stored must load with `torch.load(weights_only=True)` (DESIGN.md §4).
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, NamedTuple

from lightning_fragrance.labels import RollbackReason

HISTORY_SCHEMA_VERSION = 2
"""Version of `checkpoint_history.json`; bumped when the layout of an entry changes (2: run id,
the evidence that certified an entry and the note saying why one was rejected)."""


class CheckpointStatus(str, Enum):
    """Life cycle of a committed checkpoint.

    ``pending`` until fresh evidence produced after its state was healthy, then ``certified``
    (a known-good rollback target). ``corrupt`` when its file failed the sha256 check or the
    safe load. ``rejected`` when the evidence after it was bad, it was restored and the fault
    came back, or it belongs to an abandoned branch: never a rollback target again (it stays on
    disk for forensics until retention removes it; ``note`` says why).
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
        run_id: The run that wrote it (its lineage).
        evidence: The first healthy value of each watched signal produced after this state
            (what certified it; the baseline of the "checkpoint" mode besides ``metrics``).
        note: Why it was rejected or is corrupt, for people reading the history.
        initial: The state the run started from (taken at train start): the last-resort
            target while nothing is certified yet.
        sharded: ``file`` is a directory of `torch.distributed.checkpoint` shards, one file per
            rank plus DCP's ``.metadata`` and Lightning's ``meta.pt``; ``sha256`` and
            ``bytes`` then cover `files` as a whole.
        files: For a sharded checkpoint, every file of the directory:
            ``{name: {"sha256": hex, "bytes": size}}``; each is verified before anything reads it.
    """

    step: int
    file: str
    sha256: str = ""
    bytes: int = 0
    created_at: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    status: str = CheckpointStatus.PENDING.value
    pinned: bool = False
    run_id: str = ""
    evidence: dict[str, float] = dataclasses.field(default_factory=dict)
    note: str = ""
    initial: bool = False
    sharded: bool = False
    files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

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
        for name in ("metrics", "evidence"):
            kwargs[name] = {str(k): float(v) for k, v in dict(kwargs.get(name, {})).items()}
        kwargs["files"] = {
            str(k): {"sha256": str(v["sha256"]), "bytes": int(v["bytes"])}
            for k, v in dict(kwargs.get("files", {})).items()
        }
        return cls(**kwargs)

    def baseline(self) -> dict[str, float]:
        """What the "checkpoint" baseline mode compares with: the metrics recorded at the save
        (the guide's figures), completed by the certifying evidence for signals it lacks."""
        return {**self.evidence, **self.metrics}


@dataclasses.dataclass(frozen=True)
class Reading:
    """One value of a watched signal and when it was produced.

    Steps count optimizer updates: the value read at step ``t`` (after update ``t``) was
    computed from state ``t - 1`` (a loss before its backward, a rollout's reward) or from the
    update ``t - 1 -> t`` (its KL). A state is judged only by readings produced after it.

    Attributes:
        value: The number.
        produced_at: Step at which it was produced (logged or returned).
        since: The oldest state that contributed to it. Default ``produced_at - 1``; an
            epoch-level mean covers every state since the epoch began; a validation run judges
            exactly the state it evaluated (``produced_at``).
    """

    value: float
    produced_at: int
    since: int | None = None

    @property
    def first_state(self) -> int:
        """The oldest state this value reflects."""
        return self.produced_at - 1 if self.since is None else self.since


@dataclasses.dataclass(frozen=True)
class Trigger:
    """A bad reading: the rule, and the guide-style message with its figures.

    ``str(trigger)`` is the message (``loss spike 0.50 -> 1.20 (2.40x)``), what the guide
    prints after ``[롤백 트리거]``; ``code`` is the stable value for programs and metrics.
    """

    reason: RollbackReason
    message: str
    metric: str
    value: float
    baseline: float | None = None

    @property
    def code(self) -> str:
        """The `RollbackReason` value (``"loss_spike"``), for programs and metric labels."""
        return self.reason.value

    def __str__(self) -> str:
        return self.message


class RollbackDecision(NamedTuple):
    """Result of `CheckpointManager.check_rollback`; unpacks like the guide's tuple.

    Attributes:
        should_rollback: True when the step is judged divergent (also in dry-run mode).
        checkpoint: The checkpoint a rollback would restore, if any is available.
        reason: The `Trigger` (``str(reason)`` is the guide-style message, ``reason.code`` the
            `RollbackReason` value), or None when healthy.
    """

    should_rollback: bool
    checkpoint: CheckpointRecord | None
    reason: Trigger | None


def checkpoint_file_name(step: int) -> str:
    """The file name of the checkpoint taken at ``step`` (DESIGN.md §4)."""
    return f"checkpoint_step_{step}.ckpt"


SHARDED_META_FILE = "meta.pt"
"""The file of a sharded checkpoint that holds everything but the sharded tensors (loops,
callbacks, schedulers, RNG), written by rank 0 with ``torch.save``: Lightning's name for it
(``lightning.fabric.utilities.load._METADATA_FILENAME``), so ``fit(ckpt_path=<dir>)`` resumes."""


def sharded_checkpoint_name(step: int) -> str:
    """The directory name of the sharded checkpoint taken at ``step`` (no suffix: Lightning's
    ModelParallelStrategy resumes from a directory holding ``meta.pt``, whatever its name)."""
    return f"checkpoint_step_{step}"
