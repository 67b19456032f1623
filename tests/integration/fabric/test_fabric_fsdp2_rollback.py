"""The guard in a Fabric loop whose model is sharded by FSDP2, on two gloo processes: each rank
writes and restores only its own shard, a fault one rank alone sees rolls both ranks back to the
same step, damaged files are refused by their sha256 before anything reads them, Fabric's own
``fabric.load`` reads the directories, and a new guard resumes the history.

A real ``Fabric(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(...))`` whose
``parallelize_fn`` applies ``fully_shard``, in a hand-written loop, started as a standalone
script (`fabric_fsdp2_script.py`): Fabric's launcher re-runs the calling command for rank 1,
which must not be pytest. One launch runs every scenario (see the script's docstring).
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
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

SCRIPT = Path(__file__).with_name("fabric_fsdp2_script.py")
# The launch (26 updates, 10 sharded saves, 2 rollbacks, 3 loads on two gloo ranks) took 18 s
# here; the bound only stops a hang (ranks disagreeing on a collective wait forever).
RUN_TIMEOUT_S = 240
SHARD_FILES = {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fabric_fsdp2")
    code, stdout = run_ranks(
        SCRIPT, str(out), timeout_s=RUN_TIMEOUT_S, what="2-rank Fabric FSDP2 run"
    )
    assert code == 0, f"Fabric FSDP2 script failed:\n{stdout[-6000:]}"
    return out


def _report(out: Path, scenario: str, rank: int) -> dict[str, Any]:
    return json.loads((out / f"{scenario}_rank{rank}.json").read_text())


def _assert_holds_saved_shards(live_path: Path, out: Path, step: int, rank: int) -> None:
    live: dict[str, torch.Tensor] = torch.load(live_path, weights_only=True)
    saved = saved_local_shards(out, step, rank, "model", "optimizer")
    # every weight and both Adam moments of each (an empty shard stores an empty chunk)
    assert set(saved) == set(live), f"saved {sorted(saved)}, live {sorted(live)}"
    assert sum(name.startswith("exp_avg_sq.") for name in saved) == 6
    for name, tensor in live.items():
        assert torch.equal(tensor, saved[name]), f"{live_path.name}: {name} != step {step}"


def test_every_checkpoint_is_a_directory_with_one_shard_file_per_rank(out: Path) -> None:
    entries = history_entries(out)
    assert sorted(entries) == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    for step, entry in entries.items():
        directory = out / "checkpoints" / f"checkpoint_step_{step}"
        assert entry["sharded"] and entry["file"] == directory.name
        assert set(entry["files"]) == SHARD_FILES == set(os.listdir(directory))


def test_no_rank_saved_the_full_state(out: Path) -> None:
    metadata = verified_metadata(out, 15)
    for rank in (0, 1):
        split = 0
        for fqn, chunk in rank_chunks(metadata, rank):
            stored = metadata.state_dict_metadata[fqn]
            assert isinstance(stored, TensorStorageMetadata)
            if len(stored.size) and stored.size[0] >= 2:  # a tensor FSDP2 splits by rows
                assert chunk.sizes[0] < stored.size[0], f"rank {rank} saved all of {fqn}"
                split += 1
        # weight and bias of the two 64-row layers, each with both Adam moments
        assert split == 2 * 2 * 3, (rank, split)


def test_a_fault_on_rank_1_alone_rolls_both_ranks_back_to_the_same_step(out: Path) -> None:
    rank0, rank1 = _report(out, "run", 0), _report(out, "run", 1)
    moves = [
        [(e["at_step"], e["to_step"], e["from_memory"]) for e in r["rollback_events"]]
        for r in (rank0, rank1)
    ]
    # 8 -> 6 (the newest certified save); 14 -> 6 past the damaged 12 and 9. Sharded
    # rollbacks always load the verified shards (no in-memory snapshot).
    assert moves[0] == moves[1] == [(8, 6, False), (14, 6, False)]
    assert rank0["ledger"] == rank1["ledger"]
    assert rank0["saved"] == rank1["saved"] == [3, 6, 9, 12, 15, 18]


def test_after_each_rollback_each_rank_holds_exactly_its_saved_shard(out: Path) -> None:
    # Rank 1 had multiplied its own rows of the first layer by 100 at each fault.
    for index in (0, 1):
        for rank in (0, 1):
            live = out / f"run_rank{rank}_restored{index}.pt"
            _assert_holds_saved_shards(live, out, 6, rank)
    ranks = [torch.load(out / f"run_rank{r}_restored0.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["0.weight"], ranks[1]["0.weight"])  # two different shards


def test_damaged_shard_and_metadata_are_refused_by_sha256_before_anything_reads_them(
    out: Path,
) -> None:
    entries = history_entries(out)
    assert entries[12]["status"] == "corrupt" and "__1_0.distcp" in entries[12]["note"]
    assert entries[9]["status"] == "corrupt" and ".metadata" in entries[9]["note"]
    # Step 9's .metadata was replaced by a pickle that creates this directory when unpickled.
    assert not (out / "unpickled_metadata_marker").exists()


def test_fabric_load_reads_the_guards_directory_into_fresh_objects(out: Path) -> None:
    for rank in (0, 1):
        _assert_holds_saved_shards(out / f"fabric_load_rank{rank}_loaded.pt", out, 18, rank)
        report = _report(out, "fabric_load", rank)
        # plain values come back from meta.pt; the RNG is the remainder fabric.load returns
        assert report == {"temperature": 1.0, "remainder": ["lightning_fragrance_rng"]}


def test_a_resumed_guard_loads_the_newest_checkpoint_and_continues_its_history(
    out: Path,
) -> None:
    run = _report(out, "run", 0)
    for rank in (0, 1):
        resumed = _report(out, "resume", rank)
        assert resumed["loaded"] == 18 and resumed["saved"] == [21, 24]
        assert resumed["run_id"] == run["run_id"] and resumed["rollback_events"] == []
        _assert_holds_saved_shards(out / f"resume_rank{rank}_loaded.pt", out, 18, rank)
    entries = history_entries(out)
    assert {entries[s]["run_id"] for s in (21, 24)} == {run["run_id"]}


def test_loading_a_damaged_checkpoint_is_refused_on_every_rank_before_reading_it(
    out: Path,
) -> None:
    for rank in (0, 1):
        report = _report(out, "corrupt_load", rank)
        assert report["refused"].startswith("CheckpointCorruptError"), report
        assert "checkpoint_step_12/__1_0.distcp" in report["refused"]
        assert report["untouched"], "the live state changed although the load was refused"


def test_a_sharded_guard_on_an_object_store_is_refused_on_every_rank(out: Path) -> None:
    for rank in (0, 1):
        refused = json.loads((out / f"object_store_rank{rank}.json").read_text())
        assert refused.startswith("CheckpointDirectoryError"), refused
        assert "local or shared filesystem path" in refused
