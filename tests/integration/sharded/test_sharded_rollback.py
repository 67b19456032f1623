"""Sharded checkpoints under FSDP2 on two gloo processes: each rank writes and restores only its
own shard, a fault one rank alone sees rolls both ranks back to the same step, damaged files are
refused by their sha256 before anything reads them, a failed write commits nothing, and
``fit(ckpt_path=<dir>)``, ``lf-checkpoints verify`` and ``lf-export`` work on the directories.

A real ``Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(...))`` whose
module applies ``fully_shard`` in ``configure_model``, started as a standalone script
(`fsdp2_rollback_script.py`): Lightning's launcher re-runs the calling command for rank 1, which
must not be pytest. One launch runs every scenario (see the script's docstring).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from dcp_inspect import history_entries, rank_chunks, saved_local_shards, verified_metadata
from multirank import run_ranks
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_fragrance.checkpointing.sharded import consolidate_checkpoint
from lightning_fragrance.cli import checkpoints as checkpoints_cli
from lightning_fragrance.serving.loading import ExportError, export, register_model_class

SCRIPT = Path(__file__).with_name("fsdp2_rollback_script.py")
# The launch (three fits on two gloo ranks, 50 steps in all) took 40-46 s here; the bound only
# stops a hang (ranks disagreeing on a collective wait forever) from eating the suite.
RUN_TIMEOUT_S = 240
SHARD_FILES = {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"}
MODEL_CLASS = "tests.sharded.Regression"


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    code, stdout = run_ranks(SCRIPT, str(out), timeout_s=RUN_TIMEOUT_S, what="2-rank FSDP2 run")
    assert code == 0, f"FSDP2 script failed:\n{stdout[-6000:]}"
    return out


def _report(out: Path, scenario: str, rank: int) -> dict[str, Any]:
    return json.loads((out / f"{scenario}_rank{rank}.json").read_text())


def _history(out: Path) -> dict[str, Any]:
    return json.loads((out / "checkpoints" / "checkpoint_history.json").read_text())


def _assert_holds_saved_shards(live_path: Path, out: Path, step: int, rank: int) -> None:
    live: dict[str, torch.Tensor] = torch.load(live_path, weights_only=True)
    saved = saved_local_shards(out, step, rank, "state_dict", "optimizer_0")
    assert set(saved) <= set(live), f"{live_path.name}: saved {sorted(saved)}, live {sorted(live)}"
    for name, tensor in live.items():
        if name not in saved:  # an empty shard (this rank holds no row of it) stores no chunk
            assert tensor.numel() == 0, f"{live_path.name}: {name} has no saved chunk"
            continue
        assert torch.equal(tensor, saved[name]), f"{live_path.name}: {name} != step {step}"


def test_every_checkpoint_is_a_directory_with_one_shard_file_per_rank(out: Path) -> None:
    entries = history_entries(out)
    assert sorted(entries) == [0, 3, 6, 9, 12, 15, 21, 24, 27]
    for step, entry in entries.items():
        directory = out / "checkpoints" / f"checkpoint_step_{step}"
        assert entry["sharded"] and entry["file"] == directory.name
        assert set(entry["files"]) == SHARD_FILES == set(os.listdir(directory))


def test_no_rank_saved_the_full_state(out: Path) -> None:
    metadata = verified_metadata(out, 15)
    sharded = 0
    for rank in (0, 1):
        for fqn, chunk in rank_chunks(metadata, rank):
            stored = metadata.state_dict_metadata[fqn]
            assert isinstance(stored, TensorStorageMetadata)
            if len(stored.size) and stored.size[0] >= 2:  # a tensor FSDP2 splits by rows
                assert chunk.sizes[0] < stored.size[0], f"rank {rank} saved all of {fqn}"
                sharded += 1
    assert sharded >= 2 * 6  # weights and biases of the two wide layers, with their moments
    sizes = [
        (out / "checkpoints" / "checkpoint_step_15" / f"__{r}_0.distcp").stat().st_size
        for r in (0, 1)
    ]
    for size in sizes:  # about half each (per-tensor headers and the tiny last layer aside)
        assert size < 0.6 * sum(sizes), sizes


def test_a_spike_on_rank_1_alone_rolls_both_ranks_back_to_the_same_step(out: Path) -> None:
    rank0, rank1 = _report(out, "run", 0), _report(out, "run", 1)
    moves = [
        [(e["at_step"], e["to_step"], e["from_memory"]) for e in r["rollback_events"]]
        for r in (rank0, rank1)
    ]
    # Sharded rollbacks always load the verified shards (no in-memory snapshot).
    assert moves[0] == moves[1] == [(8, 6, False), (14, 6, False)]
    assert rank0["ledger"] == rank1["ledger"]
    rollbacks = [e for e in _history(out)["events"] if e["type"] == "rollback"]
    assert [(e["at_step"], e["to_step"]) for e in rollbacks] == [(8, 6), (14, 6)]


def test_after_each_rollback_each_rank_holds_exactly_its_saved_shard(out: Path) -> None:
    for index in (0, 1):
        for rank in (0, 1):
            live = out / f"run_rank{rank}_restored{index}.pt"
            _assert_holds_saved_shards(live, out, 6, rank)


def test_damaged_shard_and_metadata_are_refused_by_sha256_before_anything_reads_them(
    out: Path,
) -> None:
    entries = history_entries(out)
    assert entries[12]["status"] == "corrupt" and "__1_0.distcp" in entries[12]["note"]
    assert entries[9]["status"] == "corrupt" and ".metadata" in entries[9]["note"]
    # Step 9's .metadata was replaced by a pickle that creates this directory when unpickled.
    assert not (out / "unpickled_metadata_marker").exists()
    for rank in (0, 1):
        ledger = dict((step, status) for step, status in _report(out, "run", rank)["ledger"])
        assert ledger[9] == ledger[12] == "corrupt"


def test_a_failed_write_on_one_rank_commits_nothing_and_training_goes_on(out: Path) -> None:
    assert 18 not in history_entries(out)
    names = set(os.listdir(out / "checkpoints"))
    assert "checkpoint_step_18" not in names and "checkpoint_step_18.tmp" not in names
    for rank in (0, 1):
        steps = [step for step, _ in _report(out, "run", rank)["ledger"]]
        assert 18 not in steps and 21 in steps


def test_fit_resumes_from_a_sharded_checkpoint_directory(out: Path) -> None:
    run, resumed = _report(out, "run", 0), _report(out, "resume", 0)
    assert resumed["start_step"] == 21 and resumed["global_step"] == 27
    assert resumed["run_id"] == run["run_id"]  # the same lineage, in the same history
    for rank in (0, 1):
        _assert_holds_saved_shards(out / f"resume_rank{rank}_start.pt", out, 21, rank)
    entries = history_entries(out)
    assert {entries[s]["run_id"] for s in (21, 24, 27)} == {run["run_id"]}


def test_resuming_from_a_damaged_directory_is_refused_before_lightning_reads_it(
    out: Path,
) -> None:
    for rank in (0, 1):
        report = _report(out, "corrupt_resume", rank)
        assert report["refused"].startswith("CheckpointCorruptError"), report
        assert "checkpoint_step_12/__1_0.distcp" in report["refused"]
        assert report["start_step"] == -1  # never trained


def test_lf_checkpoints_verify_rehashes_every_shard_and_flags_the_damaged_ones(
    out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = checkpoints_cli.main(["verify", str(out / "checkpoints")])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1
    corrupt = [line for line in lines if line.startswith("CORRUPT")]
    assert len(corrupt) == 2
    assert "step=9 " in corrupt[0] and ".metadata" in corrupt[0]
    assert "step=12 " in corrupt[1] and "__1_0.distcp" in corrupt[1]
    assert sum(line.startswith("OK") for line in lines) == 7


def _regression(hparams: Any) -> nn.Module:
    width = int(hparams["width"])
    return nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )


def test_lf_export_consolidates_a_sharded_checkpoint_after_verifying_it(
    out: Path, tmp_path: Path
) -> None:
    register_model_class(MODEL_CLASS, _regression, "net.")
    source = out / "checkpoints" / "checkpoint_step_21"
    version = export(source, tmp_path / "exports", model_class=MODEL_CLASS)
    exported = load_file(str(version / "model.safetensors"))
    full = consolidate_checkpoint(source)["state_dict"]
    assert set(exported) == {k.removeprefix("net.") for k in full}
    for name, tensor in exported.items():
        assert torch.equal(tensor, full[f"net.{name}"]), name
    # The two ranks' rows of the wide layer, put back together.
    assert exported["2.weight"].shape == (256, 256)
    with pytest.raises(ExportError, match="corrupt"):
        export(
            out / "checkpoints" / "checkpoint_step_12",
            tmp_path / "exports",
            model_class=MODEL_CLASS,
        )
