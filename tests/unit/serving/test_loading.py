"""Export and safe loading: atomic layout, CURRENT pointer, and every way an export can be bad."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_fragrance.fragrance import formulate, parse_brief
from lightning_fragrance.rl import PPO
from lightning_fragrance.serving.loading import (
    CURRENT_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ChecksumMismatchError,
    ExportError,
    ExportManifest,
    ExportNotFoundError,
    ExportStore,
    IncompleteExportError,
    InvalidVersionNameError,
    ManifestInvalidError,
    ModelClassNotAllowedError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    WeightsFormatError,
    export,
    load_checkpoint_safely,
    read_current,
    sha256_file,
    validate_version_name,
    write_current,
)


class _Payload:
    """Pickles to a call of os.system that creates a marker file: it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def write_malicious_pickle(path: Path, marker: Path) -> None:
    with path.open("wb") as fh:
        pickle.dump({"state_dict": _Payload(marker)}, fh)


@pytest.fixture
def store(tmp_path: Path, ppo_checkpoints: list[Path]) -> ExportStore:
    export(ppo_checkpoints[0], tmp_path / "exports", make_current=True)
    return ExportStore(tmp_path / "exports")


def test_export_writes_weights_config_and_a_manifest_with_sha256s(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    out = export(ppo_checkpoints[1], tmp_path / "exports", metrics={"reward": 12.5})
    assert out.name == "000001-step2"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", WEIGHTS_FILE]
    manifest = ExportManifest.model_validate_json((out / MANIFEST_FILE).read_text())
    assert manifest.source_step == 2
    assert manifest.metrics == {"reward": 12.5}
    assert manifest.source_checkpoint == str(ppo_checkpoints[1].resolve())
    for name, entry in manifest.files.items():
        assert entry.sha256 == sha256_file(out / name)
    config = json.loads((out / "config.json").read_text())
    assert config["model_class"] == "lightning_fragrance.rl.PolicyNetwork"
    assert config["hparams"]["hidden_sizes"] == [16, 16]
    assert not [p for p in (tmp_path / "exports").iterdir() if p.name.startswith(".tmp")]


def test_exported_policy_gives_the_same_formula_as_the_trained_one(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    out = export(ppo_checkpoints[1], tmp_path / "exports")
    loaded = ExportStore(tmp_path / "exports").load(out.name)
    trained = PPO.policy_from_checkpoint(str(ppo_checkpoints[1]))
    brief = parse_brief("fresh citrus for summer")
    assert formulate(loaded.model, brief) == formulate(trained, brief)  # type: ignore[arg-type]


def test_versions_are_zero_padded_and_sort_in_export_order(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    root = tmp_path / "exports"
    names = [export(ppo_checkpoints[i % 2], root).name for i in range(3)]
    assert names == ["000001-step1", "000002-step2", "000003-step1"]
    store = ExportStore(root)
    assert store.versions() == sorted(names) == names
    assert store.newest() == "000003-step1"


def test_current_pointer_is_written_atomically_and_read_back(tmp_path: Path) -> None:
    write_current(tmp_path, "000004-step10")
    assert read_current(tmp_path) == "000004-step10"
    assert [p.name for p in tmp_path.iterdir()] == [CURRENT_FILE]
    (tmp_path / CURRENT_FILE).write_text("../../etc\n")
    assert read_current(tmp_path) is None


@pytest.mark.parametrize(
    "name",
    ["../000001-step1", "a/b", "..", "http://evil/x", "s3:bucket", "file:x", "", ".hidden", "a\\b"],
)
def test_version_names_with_paths_or_urls_are_rejected(name: str) -> None:
    with pytest.raises(InvalidVersionNameError):
        validate_version_name(name)


def test_loading_a_missing_version_names_the_available_ones(store: ExportStore) -> None:
    with pytest.raises(ExportNotFoundError, match="000001-step1"):
        store.load("000099-step1")


def test_a_corrupted_weights_file_fails_the_checksum(store: ExportStore) -> None:
    weights = store.root / "000001-step1" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as info:
        store.load("000001-step1")
    assert info.value.reload_result == "validation_failed"
    assert info.value.to_dict()["reason"] == "checksum_mismatch"


def test_a_truncated_weights_file_is_refused_even_without_checksums(store: ExportStore) -> None:
    weights = store.root / "000001-step1" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ChecksumMismatchError):
        store.load("000001-step1")
    unchecked = ExportStore(store.root, verify_checksums=False)
    with pytest.raises(WeightsFormatError, match="not a valid safetensors file"):
        unchecked.load("000001-step1")


def _reseal(directory: Path) -> None:
    """Rewrite the manifest's checksums so only the content check can catch the change."""
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"] = sha256_file(directory / name)
        entry["bytes"] = (directory / name).stat().st_size
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_wrong_shape_weights_are_refused_with_the_offending_keys(
    store: ExportStore, tmp_path: Path
) -> None:
    directory = store.root / "000001-step1"
    config = json.loads((directory / "config.json").read_text())
    config["hparams"]["hidden_sizes"] = [8, 8]
    (directory / "config.json").write_text(json.dumps(config))
    _reseal(directory)
    with pytest.raises(StateDictMismatchError, match=r"shape mismatch .*body\.0\.weight"):
        store.load("000001-step1")


def test_a_pickle_disguised_as_safetensors_never_runs(store: ExportStore, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    directory = store.root / "000001-step1"
    write_malicious_pickle(directory / WEIGHTS_FILE, marker)
    _reseal(directory)
    with pytest.raises(WeightsFormatError):
        store.load("000001-step1")
    assert not marker.exists()


def test_a_malicious_checkpoint_is_refused_by_weights_only_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _Payload(marker)}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="was not unpickled"):
        load_checkpoint_safely(ckpt)
    with pytest.raises(UnsafeCheckpointError):
        export(ckpt, tmp_path / "exports")
    assert not marker.exists()
    assert not (tmp_path / "exports").exists() or not list((tmp_path / "exports").iterdir())


def test_a_truncated_checkpoint_is_a_format_error(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(ppo_checkpoints[0].read_bytes()[:500])
    with pytest.raises(WeightsFormatError):
        load_checkpoint_safely(broken)


def test_a_model_class_outside_the_allowlist_is_refused(store: ExportStore) -> None:
    directory = store.root / "000001-step1"
    config = json.loads((directory / "config.json").read_text())
    config["model_class"] = "os.system"
    (directory / "config.json").write_text(json.dumps(config))
    _reseal(directory)
    with pytest.raises(ModelClassNotAllowedError, match="not allowlisted"):
        store.load("000001-step1")


def test_an_export_without_manifest_is_incomplete_and_not_listed(store: ExportStore) -> None:
    partial = store.root / "000002-step9"
    shutil.copytree(store.root / "000001-step1", partial)
    (partial / MANIFEST_FILE).unlink()
    assert store.complete_versions() == ["000001-step1"]
    with pytest.raises(IncompleteExportError):
        store.load("000002-step9")


def test_a_manifest_from_another_schema_is_invalid(store: ExportStore) -> None:
    path = store.root / "000001-step1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestInvalidError):
        store.load("000001-step1")


def test_export_refuses_a_checkpoint_without_a_state_dict(tmp_path: Path) -> None:
    ckpt = tmp_path / "empty.ckpt"
    torch.save({"global_step": 3}, ckpt)
    with pytest.raises(ExportError, match="no 'state_dict'"):
        export(ckpt, tmp_path / "exports")


def test_set_current_refuses_a_version_that_does_not_exist(store: ExportStore) -> None:
    with pytest.raises(ExportNotFoundError):
        store.set_current("000042-step1")
    assert store.current() == "000001-step1"


_IMPORT_PROBE = """
import sys
import lightning_fragrance.serving.loading as loading
from lightning_fragrance.rl import PolicyNetwork, build_policy_net
from lightning_fragrance.rl.networks import PolicySpec
assert loading.DEFAULT_MODEL_CLASS == "lightning_fragrance.rl.PolicyNetwork"
print(sorted(m for m in sys.modules if m == "lightning" or m.startswith("lightning.")))
import lightning_fragrance.rl as rl
ppo = rl.PPO  # the Lightning module is still there, loaded on first use
print("lightning" in sys.modules, ppo.__module__)
"""


def test_the_serving_loader_and_the_policy_networks_import_without_lightning() -> None:
    # A fresh interpreter: this test process imported Lightning long ago. Serving workers pay
    # every import at start, and Lightning is 9-20 s of it on a small machine.
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    before_ppo, after_ppo = done.stdout.strip().splitlines()
    assert before_ppo == "[]", f"Lightning modules imported by serving: {before_ppo}"
    assert after_ppo == "True lightning_fragrance.rl.ppo"
