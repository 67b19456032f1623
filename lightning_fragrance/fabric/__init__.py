"""Lightning Fabric adapter: the rollback guard in a hand-written Fabric training loop."""

from lightning_fragrance.fabric.rollback import FabricRollbackGuard
from lightning_fragrance.fabric.state import RNG_KEY, FabricState

__all__ = ["RNG_KEY", "FabricRollbackGuard", "FabricState"]
