"""Lightning callbacks: the adapters that drive the engines from the Trainer's hooks."""

from lightning_fragrance.callbacks.faults import FaultInjection as FaultInjection
from lightning_fragrance.callbacks.rollback import RollbackCheckpoint

__all__ = ["FaultInjection", "RollbackCheckpoint"]
