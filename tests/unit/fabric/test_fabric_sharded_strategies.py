"""Which Fabric strategies `FabricRollbackGuard` saves shard by shard, which it refuses, and
the refusals' messages; raised at construction, before any collective (the 2-rank FSDP2 run is
in tests/integration/fabric/test_fabric_fsdp2_rollback.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_fragrance.fabric import FabricRollbackGuard
from lightning_fragrance.fabric.sharded_state import saves_sharded


def _identity(model: nn.Module, mesh: object) -> nn.Module:
    return model


def test_model_parallel_and_sharded_fsdp_save_shards_ddp_saves_one_file() -> None:
    assert saves_sharded(ModelParallelStrategy(_identity), "guard")
    # FSDPStrategy needs a GPU to run; its configuration is checked without one.
    assert saves_sharded(FSDPStrategy(state_dict_type="sharded"), "guard")
    assert not saves_sharded(DDPStrategy(), "guard")


def test_a_sharded_strategy_set_to_gather_on_rank_0_is_refused_with_the_setting_to_change() -> None:
    gather = ModelParallelStrategy(_identity, save_distributed_checkpoint=False)
    with pytest.raises(ValueError, match=r"save_distributed_checkpoint=False.*Keep the default"):
        saves_sharded(gather, "FabricRollbackGuard")
    with pytest.raises(ValueError, match=r"state_dict_type='full'.*\"sharded\""):
        saves_sharded(FSDPStrategy(state_dict_type="full"), "FabricRollbackGuard")


def test_deepspeed_is_refused_with_the_supported_strategies() -> None:
    # DeepSpeed cannot be installed here (Lightning's DeepSpeedStrategy() raises ImportError
    # without it): a DDP strategy under its class name stands in for it.
    class DeepSpeedStrategy(DDPStrategy):
        pass

    with pytest.raises(NotImplementedError, match=r"DeepSpeedStrategy.*ModelParallelStrategy"):
        saves_sharded(DeepSpeedStrategy(), "FabricRollbackGuard")


def test_the_guard_refuses_a_gathering_model_parallel_strategy_at_construction(
    tmp_path: Path,
) -> None:
    strategy = ModelParallelStrategy(_identity, save_distributed_checkpoint=False)
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy)
    with pytest.raises(ValueError, match="FabricRollbackGuard under ModelParallelStrategy"):
        FabricRollbackGuard(fabric, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing claimed
