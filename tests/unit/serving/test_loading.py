"""Export and safe loading: atomic layout, CURRENT pointer, and every way an export can be bad."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
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
    UnsafeExportFileError,
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
    # The size the manifest declares always binds; a manifest that agrees with the cut file
    # still leaves a file that is not safetensors.
    manifest_path = store.root / "000001-step1" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][WEIGHTS_FILE]["bytes"] = 100
    manifest_path.write_text(json.dumps(manifest))
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


# --------------------------------------------------------------------------- hostile exports
# Issue 10: every bad export gets a bounded cost. Loads that could hang run in a daemon thread
# whose join is bounded, so a regression fails the test instead of hanging the suite.


def _load_outcome(store: ExportStore, version: str, timeout: float = 60.0) -> BaseException:
    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            store.load(version)
        except BaseException as exc:  # the test inspects whatever was raised
            outcome["error"] = exc
        else:
            outcome["error"] = None

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"loading {version} had not returned after {timeout} s"
    error = outcome["error"]
    assert error is not None, f"{version} loaded although it must be refused"
    return error


def _add_manifest_entry(directory: Path, name: str, sha256: str, size: int) -> None:
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["files"][name] = {"sha256": sha256, "bytes": size}
    path.write_text(json.dumps(manifest))


def test_a_manifest_entry_naming_dev_zero_is_refused_without_reading_it(
    store: ExportStore,
) -> None:
    _add_manifest_entry(store.root / "000001-step1", "/dev/zero", "0" * 64, 1 << 40)
    error = _load_outcome(store, "000001-step1")
    assert isinstance(error, UnsafeExportFileError)
    assert "'/dev/zero' is not a plain file name" in str(error)


def test_a_fifo_in_the_export_is_refused_without_blocking_on_it(store: ExportStore) -> None:
    directory = store.root / "000001-step1"
    os.mkfifo(directory / "extra.bin")
    _add_manifest_entry(directory, "extra.bin", "0" * 64, 16)
    error = _load_outcome(store, "000001-step1")
    assert isinstance(error, UnsafeExportFileError)
    assert "not a regular file" in str(error)


def test_a_file_larger_than_its_manifest_declares_is_refused_by_its_size(
    store: ExportStore,
) -> None:
    directory = store.root / "000001-step1"
    (directory / "extra.bin").write_bytes(b"x" * 4096)
    _add_manifest_entry(directory, "extra.bin", sha256_file(directory / "extra.bin"), 16)
    error = _load_outcome(store, "000001-step1")
    assert isinstance(error, ChecksumMismatchError)
    assert "has 4096 bytes, the manifest declares 16" in str(error)


def test_a_fifo_as_current_reads_as_no_pointer_instead_of_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / CURRENT_FILE)
    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(read_current(tmp_path)), daemon=True)
    thread.start()
    thread.join(30)
    assert result == [None]


def test_a_manifest_entry_outside_the_export_is_refused_even_with_the_right_hash(
    store: ExportStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n")
    directory = store.root / "000001-step1"
    _add_manifest_entry(
        directory, "../../outside.txt", sha256_file(outside), outside.stat().st_size
    )
    error = _load_outcome(store, "000001-step1")
    assert isinstance(error, UnsafeExportFileError)
    assert error.reload_result == "validation_failed"


def test_a_refused_outside_entry_never_echoes_the_outside_files_hash(
    store: ExportStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("a secret the server may read but must not reveal\n")
    _add_manifest_entry(
        store.root / "000001-step1", "../../outside.txt", "0" * 64, outside.stat().st_size
    )
    error = _load_outcome(store, "000001-step1")
    assert sha256_file(outside)[:12] not in str(error)
    assert isinstance(error, UnsafeExportFileError)


@pytest.mark.parametrize("entry", ["notes.txt", WEIGHTS_FILE])
def test_a_symlink_inside_the_export_is_refused(
    store: ExportStore, tmp_path: Path, entry: str
) -> None:
    directory = store.root / "000001-step1"
    target = tmp_path / "elsewhere.bin"
    if entry == WEIGHTS_FILE:
        shutil.move(directory / WEIGHTS_FILE, target)  # same bytes, now outside the export
    else:
        target.write_text("outside\n")
        _add_manifest_entry(directory, entry, sha256_file(target), target.stat().st_size)
    (directory / entry).symlink_to(target)
    error = _load_outcome(store, "000001-step1")
    assert isinstance(error, UnsafeExportFileError)
    assert "symbolic link" in str(error)


def test_a_symlinked_version_directory_is_skipped_and_refused_by_name(
    store: ExportStore, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(store.root / "000001-step1", elsewhere / "000001-step1")
    (store.root / "000009-linked").symlink_to(elsewhere / "000001-step1")
    assert store.complete_versions() == ["000001-step1"]
    assert store.newest() == "000001-step1"
    with pytest.raises(InvalidVersionNameError, match="symbolic link"):
        store.load("000009-linked")


def _write_sparse_safetensors(path: Path, name: str, shape: list[int]) -> None:
    """A safetensors file whose one F32 tensor is all zero bytes, stored sparse."""
    size = 4
    for dim in shape:
        size *= dim
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, size]}})
    header_bytes = header.encode().ljust(((len(header) + 7) // 8) * 8)
    with path.open("wb") as fh:
        fh.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
    os.truncate(path, 8 + len(header_bytes) + size)


_PEAK_RSS_GROWTH = """
import resource, sys
from pathlib import Path
import torch
from lightning_fragrance.serving.loading import ExportStore, ModelLoadError, ExportError, export
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if sys.argv[1] == "load":
        ExportStore(sys.argv[2], verify_checksums=False).load(sys.argv[3])
    else:
        export(sys.argv[2], sys.argv[3])
    print("accepted")
except (ModelLoadError, ExportError) as exc:
    print(type(exc).__name__, str(exc)[:300].replace(chr(10), " "))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def _peak_rss_growth_mb(*args: str, cwd: Path) -> tuple[str, int]:
    """Run a load or an export in a fresh interpreter: (its outcome, peak RSS growth in MB)."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_GROWTH, *args],
        cwd=cwd,  # not the repository: `-c` puts the working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    outcome, growth = done.stdout.strip().splitlines()[-2:]
    return outcome, int(growth)


def test_a_huge_tensor_in_a_sparse_file_is_refused_from_its_header_before_any_read(
    store: ExportStore,
) -> None:
    directory = store.root / "000001-step1"
    weights = directory / WEIGHTS_FILE
    _write_sparse_safetensors(weights, "body.0.weight", [16384, 16384])  # 1 GiB of zeros
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["files"][WEIGHTS_FILE]["bytes"] = weights.stat().st_size
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert weights.stat().st_blocks * 512 < 1 << 20  # really sparse: nothing to read from disk

    outcome, growth_mb = _peak_rss_growth_mb(
        "load", str(store.root), "000001-step1", cwd=store.root.parent
    )

    assert outcome.startswith("StateDictMismatchError"), outcome
    assert "shape mismatch" in outcome and "(16384, 16384)" in outcome
    assert growth_mb < 256, f"peak RSS grew {growth_mb} MB: the 1 GiB tensor was read"


def test_export_refuses_hyperparameters_of_a_huge_model_without_building_it(
    ppo_checkpoints: list[Path], tmp_path: Path
) -> None:
    ckpt = torch.load(ppo_checkpoints[0], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["hidden_sizes"] = [8000, 8000]
    forged = tmp_path / "forged.ckpt"
    torch.save(ckpt, forged)

    outcome, growth_mb = _peak_rss_growth_mb(
        "export", str(forged), str(tmp_path / "exports"), cwd=tmp_path
    )

    assert outcome.startswith("StateDictMismatchError"), outcome
    assert "(8000, 8000)" in outcome
    assert growth_mb < 128, f"peak RSS grew {growth_mb} MB: the 8000x8000 model was built"
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def test_export_refuses_a_store_checkpoint_that_fails_its_history_sha256(
    ppo_checkpoints: list[Path], tmp_path: Path
) -> None:
    from lightning_fragrance.checkpointing.store import CheckpointStore

    ckpt = torch.load(ppo_checkpoints[0], map_location="cpu", weights_only=True)
    checkpoints = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    record = checkpoints.commit(1, ckpt, {"reward": 1.0})
    path = Path(checkpoints.path(record.file))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside a tensor: torch.load would still read it
    path.write_bytes(bytes(data))
    assert not CheckpointStore(str(path.parent), read_only=True).verify(record)

    with pytest.raises(ExportError, match="fails its integrity check") as info:
        export(path, tmp_path / "exports")
    assert "CORRUPT" in str(info.value) and record.sha256[:12] in str(info.value)
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def test_export_of_an_intact_store_checkpoint_passes_the_history_check(
    ppo_checkpoints: list[Path], tmp_path: Path
) -> None:
    from lightning_fragrance.checkpointing.store import CheckpointStore

    ckpt = torch.load(ppo_checkpoints[0], map_location="cpu", weights_only=True)
    checkpoints = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    record = checkpoints.commit(1, ckpt, {"reward": 1.0})
    out = export(checkpoints.path(record.file), tmp_path / "exports")
    assert ExportStore(tmp_path / "exports").read_manifest(out.name).metrics == {"reward": 1.0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_export_refuses_non_finite_weights(
    ppo_checkpoints: list[Path], tmp_path: Path, bad: float
) -> None:
    ckpt = torch.load(ppo_checkpoints[0], map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("policy_net.body.0.weight"))
    ckpt["state_dict"][key][0, 0] = bad
    poisoned = tmp_path / "poisoned.ckpt"
    torch.save(ckpt, poisoned)
    with pytest.raises(ExportError, match=r"'body\.0\.weight' has non-finite values"):
        export(poisoned, tmp_path / "exports")


def test_every_file_of_an_export_gets_the_same_mode(store: ExportStore) -> None:
    directory = store.root / "000001-step1"
    modes = {
        name: stat.S_IMODE((directory / name).stat().st_mode) for name in os.listdir(directory)
    }
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_config_larger_than_its_cap_is_refused_before_it_is_read(store: ExportStore) -> None:
    directory = store.root / "000001-step1"
    config = directory / "config.json"
    with config.open("ab") as fh:
        fh.truncate(2 << 20)  # 2 MiB of JSON padding would be parsed whole
    _reseal(directory)
    error = _load_outcome(store, "000001-step1")
    assert isinstance(error, ManifestInvalidError)
    assert "over the limit of 1048576" in str(error)
