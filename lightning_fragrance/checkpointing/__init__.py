"""Checkpointing with automatic rollback: the engine (plain Python + torch, no Lightning).

`RollbackOrchestrator` is the one save -> judge -> roll back -> record sequence; its drivers are
`CheckpointManager` (the operations guide's API for a plain PyTorch loop) and the Lightning
callback `lightning_fragrance.callbacks.RollbackCheckpoint`. Decisions: `RollbackGuard`; files:
`CheckpointStore` through `AsyncCheckpointWriter`.
"""

from lightning_fragrance.checkpointing.conditions import BaselineMode, RollbackConditions
from lightning_fragrance.checkpointing.errors import (
    CheckpointCorruptError,
    CheckpointDirectoryError,
    CheckpointError,
    MissingMetricError,
    NoGoodCheckpointError,
    RollbackBudgetExceeded,
    ShardedWriteError,
)
from lightning_fragrance.checkpointing.guard import Observation, RollbackGuard
from lightning_fragrance.checkpointing.manager import CheckpointManager
from lightning_fragrance.checkpointing.observers import (
    CheckpointObserver,
    LoggingObserver,
    NullObserver,
    ObserverGroup,
)
from lightning_fragrance.checkpointing.orchestrator import (
    RollbackOrchestrator,
    StateProvider,
    StepOutcome,
    next_save_step,
)
from lightning_fragrance.checkpointing.records import (
    HISTORY_SCHEMA_VERSION,
    CheckpointRecord,
    CheckpointStatus,
    Reading,
    RollbackDecision,
    Trigger,
    checkpoint_file_name,
)
from lightning_fragrance.checkpointing.recovery import RestoreSource, Snapshot, find_restore_source
from lightning_fragrance.checkpointing.rng import collect_rng_state, reseed, restore_rng_state
from lightning_fragrance.checkpointing.sharded import (
    ShardedCheckpointer,
    ShardedState,
    ShardedStateProvider,
    consolidate_checkpoint,
)
from lightning_fragrance.checkpointing.snapshot import (
    AsyncCheckpointWriter,
    CheckpointWriteError,
    StagingPool,
    stage_to_cpu,
)
from lightning_fragrance.checkpointing.store import HISTORY_FILE, CheckpointStore
from lightning_fragrance.checkpointing.triggers import TriggerMonitor, evaluate_step
from lightning_fragrance.labels import RollbackReason

__all__ = [
    "HISTORY_FILE",
    "HISTORY_SCHEMA_VERSION",
    "AsyncCheckpointWriter",
    "BaselineMode",
    "CheckpointCorruptError",
    "CheckpointDirectoryError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointObserver",
    "CheckpointRecord",
    "CheckpointStatus",
    "CheckpointStore",
    "CheckpointWriteError",
    "LoggingObserver",
    "MissingMetricError",
    "NoGoodCheckpointError",
    "NullObserver",
    "Observation",
    "ObserverGroup",
    "Reading",
    "RestoreSource",
    "RollbackBudgetExceeded",
    "RollbackConditions",
    "RollbackDecision",
    "RollbackGuard",
    "RollbackOrchestrator",
    "RollbackReason",
    "ShardedCheckpointer",
    "ShardedState",
    "ShardedStateProvider",
    "ShardedWriteError",
    "Snapshot",
    "StagingPool",
    "StateProvider",
    "StepOutcome",
    "Trigger",
    "TriggerMonitor",
    "checkpoint_file_name",
    "collect_rng_state",
    "consolidate_checkpoint",
    "evaluate_step",
    "find_restore_source",
    "next_save_step",
    "reseed",
    "restore_rng_state",
    "stage_to_cpu",
]
