"""A tiny brief model trained once per session: every test of the package starts from a real
`save_pretrained` directory written by the real SFT stage, in a few seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_fragrance.llm.model import BriefModelSize
from lightning_fragrance.llm.sft import SFTResult, SFTSettings, run_sft

TINY_SIZE = BriefModelSize(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory: pytest.TempPathFactory) -> SFTResult:
    torch.set_num_threads(1)
    settings = SFTSettings(
        n_train=96,
        n_val=16,
        vocab_size=600,
        size=TINY_SIZE,
        batch_size=16,
        max_epochs=2,
        val_check_interval=1.0,
        max_steps=8,
    )
    return run_sft(settings, tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="session")
def tiny_sft_dir(tiny_sft: SFTResult) -> Path:
    return tiny_sft.model_dir
