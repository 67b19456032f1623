"""Exceptions of the checkpointing engine, each with a message a user can act on."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by `lightning_fragrance.checkpointing`."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated or does not match the sha256 in the history."""


class NoGoodCheckpointError(CheckpointError):
    """A rollback was needed but no committed, intact checkpoint is left to restore."""


class RollbackBudgetExceeded(CheckpointError):
    """Too many rollbacks within the budget window: the run stops instead of thrashing.

    The message names the last good checkpoint so an operator can resume from it by hand.
    """


class MissingMetricError(CheckpointError, KeyError):
    """A metric the triggers need was neither returned by ``training_step`` nor logged
    (raised only with ``strict=True``; otherwise a warning)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointDirectoryError(CheckpointError):
    """The checkpoint directory cannot be used: another run's history is there, or this run
    cannot write to it. The message names the directory and the ways out."""


class ShardedWriteError(CheckpointError):
    """A sharded checkpoint was not committed: a rank failed to write or hash its files (or
    rank 0 to commit them). Raised on every rank alike; nothing of that step is listed."""
