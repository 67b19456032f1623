"""Fixtures of the serving unit tests: brief LLM exports (real format, random weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lightning_fragrance.serving.random_brief_model import export_random_brief_models


@pytest.fixture(scope="session")
def brief_llm_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two exports of a tiny random Qwen2 brief model in ``<root>/brief_llm`` (CURRENT = v1),
    built once: a tokenizer trained by ``tokenizers``, ``save_pretrained`` through
    ``llm.export.export_brief_model``."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("brief-exports")
    export_random_brief_models(root)
    return root / "brief_llm"


@pytest.fixture
def brief_llm_store(brief_llm_store_template: Path, tmp_path: Path) -> Path:
    """A copy of the template this test may change (CURRENT moves with reloads)."""
    target = tmp_path / "brief_exports" / "brief_llm"
    shutil.copytree(brief_llm_store_template, target)
    return target
