"""Brief model exports: a versioned Hugging Face directory with a manifest, loaded back only
after every file, hash and shape checks out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_fragrance.llm.export import (
    export_brief_checkpoint,
    export_brief_model,
    load_brief_export,
    verify_brief_export,
)
from lightning_fragrance.llm.model import load_model
from lightning_fragrance.serving.loading import (
    ChecksumMismatchError,
    ExportError,
    StateDictMismatchError,
    UnsafeExportFileError,
    read_current,
)


@pytest.fixture()
def exported(tiny_sft_dir: Path, tmp_path: Path) -> Path:
    model, tokenizer = load_model(tiny_sft_dir)
    return export_brief_model(
        model, tokenizer, tmp_path / "exports", step=7, source=str(tiny_sft_dir), make_current=True
    )


def test_an_export_is_a_versioned_hf_directory_with_current_and_a_manifest(
    exported: Path,
) -> None:
    assert exported.parent.name == "brief_llm" and exported.name == "000001-step7"
    assert read_current(exported.parent) == exported.name
    manifest = json.loads((exported / "manifest.json").read_text())
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert len(manifest["files"][name]["sha256"]) == 64
    assert manifest["source_step"] == 7
    # A plain transformers user needs nothing of ours to load it.
    assert AutoModelForCausalLM.from_pretrained(str(exported)).config.model_type == "qwen2"


def test_a_second_export_takes_the_next_version(exported: Path, tiny_sft_dir: Path) -> None:
    model, tokenizer = load_model(tiny_sft_dir)
    second = export_brief_model(
        model, tokenizer, exported.parent.parent, step=9, source=str(tiny_sft_dir)
    )
    assert second.name == "000002-step9"
    assert read_current(exported.parent) == exported.name  # CURRENT moves only when asked


def test_a_loaded_export_answers_like_the_model_it_came_from(
    exported: Path, tiny_sft_dir: Path
) -> None:
    loaded = load_brief_export(exported)
    original, _ = load_model(tiny_sft_dir)
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    assert loaded.version == exported.name


def test_a_changed_weight_file_is_refused_by_its_checksum(exported: Path) -> None:
    weights = exported / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        verify_brief_export(exported)


def test_a_file_the_manifest_does_not_list_is_refused(exported: Path) -> None:
    (exported / "modeling_evil.py").write_text("import os\n")
    with pytest.raises(UnsafeExportFileError, match=r"modeling_evil\.py"):
        load_brief_export(exported)


def test_weights_that_do_not_fit_the_config_are_refused_before_loading(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    config["hidden_size"] *= 2
    (exported / "config.json").write_text(json.dumps(config))
    manifest = json.loads((exported / "manifest.json").read_text())
    from lightning_fragrance.serving.loading import sha256_file

    entry = manifest["files"]["config.json"]
    entry.update(sha256=sha256_file(exported / "config.json"), bytes=len(json.dumps(config)))
    (exported / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StateDictMismatchError, match="shape"):
        verify_brief_export(exported)


def test_non_finite_weights_are_never_exported(tiny_sft_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(tiny_sft_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(ExportError, match="non-finite"):
        export_brief_model(model, tokenizer, tmp_path, step=1, source="test")
    assert not (tmp_path / "brief_llm").exists()


def test_a_guard_checkpoint_exports_its_policy(tiny_sft_dir: Path, tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from lightning_fragrance.callbacks import RollbackCheckpoint
    from lightning_fragrance.llm.grpo import BriefGRPO

    module = BriefGRPO(
        sft_dir=str(tiny_sft_dir), n_prompts=8, prompts_per_step=2, group_size=2, max_new_tokens=8
    )
    guard = RollbackCheckpoint(dirpath=str(tmp_path / "ckpt"), save_every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module)
    guard.flush()
    ckpt = sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]
    exported = export_brief_checkpoint(ckpt, tmp_path / "exports")
    loaded = load_brief_export(exported)
    policy = module.policy.state_dict()
    weights = loaded.model.state_dict()
    assert all(torch.equal(policy[k], weights[k]) for k in weights)
