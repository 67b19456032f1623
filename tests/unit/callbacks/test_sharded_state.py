"""Which strategies the guard saves sharded, and the configurations it refuses up front.

Strategy objects are built without a Trainer (no process group); the sharded save and restore
themselves run on two gloo processes in tests/integration/sharded/.
"""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_fragrance.callbacks.sharded_state import sharded_model_key
from lightning_fragrance.checkpointing.errors import CheckpointError


def test_fsdp2_and_sharded_fsdp_save_under_their_strategys_own_keys() -> None:
    assert sharded_model_key(ModelParallelStrategy(), "guard") == "state_dict"
    assert sharded_model_key(FSDPStrategy(state_dict_type="sharded"), "guard") == "model"


def test_replicated_strategies_keep_the_single_file_path() -> None:
    assert sharded_model_key(DDPStrategy(), "guard") is None


def test_strategies_configured_to_gather_the_full_state_are_refused() -> None:
    with pytest.raises(CheckpointError, match="save_distributed_checkpoint=False"):
        sharded_model_key(ModelParallelStrategy(save_distributed_checkpoint=False), "guard")
    with pytest.raises(CheckpointError, match="state_dict_type='full'"):
        sharded_model_key(FSDPStrategy(state_dict_type="full"), "guard")
