"""The brief model shipped in the package, and the command that reproduces it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lightning_fragrance.llm.export import copy_brief_export, load_brief_export, verify_brief_export
from lightning_fragrance.llm.model import BriefModelSize, parameter_count
from lightning_fragrance.llm.shipped import main, sft_settings, shipped_sft_dir
from lightning_fragrance.serving.loading import ChecksumMismatchError, read_current

TINY = [
    "model.sft.n_train=64",
    "model.sft.n_val=16",
    "model.sft.vocab_size=600",
    "model.sft.size.hidden_size=32",
    "model.sft.size.num_hidden_layers=1",
    "model.sft.size.num_attention_heads=2",
    "model.sft.size.num_key_value_heads=1",
    "model.sft.size.intermediate_size=64",
    "model.sft.max_steps=4",
    "model.sft.batch_size=16",
]


def test_the_shipped_model_is_a_verified_export_of_the_documented_size() -> None:
    loaded = load_brief_export(shipped_sft_dir())
    assert loaded.model.config.model_type == "qwen2"
    assert parameter_count(loaded.model) == 782_976
    assert loaded.manifest.source_step == 1250


def test_the_reproduction_uses_the_sft_settings_of_lf_train_task_brief_llm() -> None:
    settings = sft_settings(seed=0)
    assert (settings.n_train, settings.n_val, settings.vocab_size) == (4000, 256, 2048)
    assert settings.size == BriefModelSize()  # hidden 128, 3 layers: the shipped architecture
    assert sft_settings(seed=3, overrides=["model.sft.n_train=10"]).seed == 3


def test_the_command_writes_a_loadable_export_in_place_of_the_old_one(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    output = tmp_path / "brief_sft"
    output.mkdir()
    (output / "stale.txt").write_text("an older model's file")
    assert main(["--output", str(output), *TINY]) == 0
    loaded = load_brief_export(output)  # every file listed and hashed: stale.txt is gone
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["source_checkpoint"].startswith("lf-train task=brief_llm seed=0")
    assert loaded.manifest.source_step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brief_sft"]


def test_copying_the_shipped_model_into_a_store_makes_a_verified_current_version(
    tmp_path: Path,
) -> None:
    first = copy_brief_export(shipped_sft_dir(), tmp_path / "exports", make_current=True)
    assert first == tmp_path / "exports" / "brief_llm" / "000001-step1250"
    assert read_current(first.parent) == first.name
    shipped = json.loads((shipped_sft_dir() / "manifest.json").read_text())
    copied = verify_brief_export(first)
    assert {k: v.sha256 for k, v in copied.files.items()} == {
        k: v["sha256"] for k, v in shipped["files"].items()
    }
    assert copy_brief_export(shipped_sft_dir(), tmp_path / "exports").name == "000002-step1250"


def test_a_changed_source_export_is_not_copied(tmp_path: Path) -> None:
    source = tmp_path / "brief_sft"
    shutil.copytree(shipped_sft_dir(), source)
    config = source / "generation_config.json"
    config.write_text(config.read_text().replace("96", "97"))
    with pytest.raises(ChecksumMismatchError, match=r"generation_config\.json"):
        copy_brief_export(source, tmp_path / "exports")
    assert not (tmp_path / "exports").exists()  # verified before anything is written
