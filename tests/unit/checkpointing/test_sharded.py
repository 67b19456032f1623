"""`ShardedCheckpointer` and the store's sharded entries, in one process (world size 1).

Real torch.distributed.checkpoint writes and reads on real files; with no process group DCP
runs single-process and the default collectives are the identity. The two-rank behaviour
(FSDP2 shards, agreement across ranks) is tested in tests/integration/sharded/.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from lightning_fragrance.checkpointing import CheckpointStore
from lightning_fragrance.checkpointing.errors import (
    CheckpointCorruptError,
    CheckpointError,
    ShardedWriteError,
)
from lightning_fragrance.checkpointing.sharded import (
    ShardedCheckpointer,
    ShardedState,
    consolidate_checkpoint,
    owner_rank,
)
from lightning_fragrance.checkpointing.store import HISTORY_FILE
from lightning_fragrance.cli import checkpoints as checkpoints_cli

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Weights:
    """A `ShardedStateProvider` over plain tensors (one rank holds its whole 'shard')."""

    def __init__(self, seed: float) -> None:
        self.live = {"w": torch.full((4, 3), seed), "b": torch.arange(3.0) + seed}
        self.extra: Mapping[str, Any] = {}

    def capture_sharded(self) -> ShardedState:
        return ShardedState({"state_dict": self.live}, {"global_step": int(self.live["b"][0])})

    def load_targets(self) -> dict[str, Any]:
        return {"state_dict": {k: torch.empty_like(v) for k, v in self.live.items()}}

    def restore_sharded(self, loaded: dict[str, Any], extra: Mapping[str, Any]) -> None:
        for name, tensor in loaded["state_dict"].items():
            self.live[name].copy_(tensor)
        self.extra = extra

    def parameters(self) -> Iterable[torch.Tensor]:
        return self.live.values()


class FullDiskWriter(dcp.FileSystemWriter):
    """DCP's own writer failing at write time, as a full disk does."""

    def write_data(self, plan: Any, planner: Any) -> Future[list[WriteResult]]:
        raise OSError(28, "No space left on device")


def _save(store: CheckpointStore, step: int, seed: float) -> None:
    ShardedCheckpointer(store).save(step, Weights(seed).capture_sharded(), {"loss": seed})


def test_a_sharded_save_commits_a_directory_listing_every_file_with_its_sha256(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(str(tmp_path))
    record = ShardedCheckpointer(store).save(3, Weights(1.0).capture_sharded(), {"loss": 0.5})
    assert record.sharded and record.file == "checkpoint_step_3"
    assert set(record.files) == {".metadata", "__0_0.distcp", "meta.pt"}
    assert set(os.listdir(tmp_path)) == {"checkpoint_step_3", HISTORY_FILE}
    listed = json.loads((tmp_path / HISTORY_FILE).read_text())["entries"][0]
    assert listed["files"] == record.files and listed["sharded"] is True
    assert store.verify(record) and store.check(record) is None


def test_a_rollback_load_restores_the_saved_tensors_and_extra_in_place(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    _save(store, 3, 1.0)
    provider = Weights(7.0)
    before = provider.live["w"]
    record = store.record(3)
    assert record is not None
    ShardedCheckpointer(store).load(record, provider)
    assert provider.live["w"] is before  # in place
    assert torch.equal(provider.live["w"], torch.full((4, 3), 1.0))
    assert provider.extra == {"global_step": 1}


def test_a_pickle_in_metadata_is_refused_by_sha256_and_never_unpickled(tmp_path: Path) -> None:
    class Bomb:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.mkdir, (str(tmp_path / "ran"),))

    store = CheckpointStore(str(tmp_path))
    _save(store, 3, 1.0)
    (tmp_path / "checkpoint_step_3" / ".metadata").write_bytes(pickle.dumps(Bomb()))
    record = store.record(3)
    assert record is not None
    with pytest.raises(CheckpointCorruptError, match=r"\.metadata \(step 3\) failed its integrity"):
        ShardedCheckpointer(store).load(record, Weights(7.0))
    assert not (tmp_path / "ran").exists()
    assert "checkpoint_step_3/.metadata" in str(store.check(record))


def test_a_failed_write_commits_nothing_and_leaves_no_directory(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    _save(store, 3, 1.0)
    failing = ShardedCheckpointer(store, storage_writer=FullDiskWriter)
    with pytest.raises(
        ShardedWriteError,
        match=r"step 6 was not committed \(rank 0: OSError: \[Errno 28\] No space left",
    ):
        failing.save(6, Weights(2.0).capture_sharded(), {"loss": 0.4})
    assert [r.step for r in store.records()] == [3]
    assert set(os.listdir(tmp_path)) == {"checkpoint_step_3", HISTORY_FILE}


def test_commit_refuses_a_directory_whose_files_the_ranks_did_not_all_report(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(str(tmp_path))
    staging = Path(store.prepare_staging(3))
    (staging / "__0_0.distcp").write_bytes(b"shard")
    (staging / "__1_0.distcp").write_bytes(b"a rank that never reported")
    with pytest.raises(CheckpointError, match="ranks reported"):
        store.commit_directory(3, {"__0_0.distcp": {"sha256": "0" * 64, "bytes": 5}}, {})
    assert store.records() == []


def test_retention_removes_whole_directories_and_orphan_staging_is_swept(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), max_checkpoints=2)
    for step in (3, 6, 9):
        _save(store, step, float(step))
    assert [r.step for r in store.records()] == [6, 9]
    assert not (tmp_path / "checkpoint_step_3").exists()
    os.makedirs(tmp_path / "checkpoint_step_12.tmp")
    (tmp_path / "checkpoint_step_12.tmp" / "__0_0.distcp").write_bytes(b"half")
    CheckpointStore(str(tmp_path), max_checkpoints=2)
    assert not (tmp_path / "checkpoint_step_12.tmp").exists()


def test_sharded_entries_are_refused_by_the_single_file_loader(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    _save(store, 3, 1.0)
    record = store.record(3)
    assert record is not None
    with pytest.raises(CheckpointError, match="collectively"):
        store.load(record)


def test_sharded_checkpoints_need_a_local_path() -> None:
    store = CheckpointStore("memory://sharded-unit/checkpoints")
    with pytest.raises(ShardedWriteError, match="local or shared filesystem"):
        _save(store, 3, 1.0)


def test_lf_checkpoints_verify_calls_a_changed_shard_corrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = CheckpointStore(str(tmp_path))
    _save(store, 3, 1.0)
    _save(store, 6, 2.0)
    assert checkpoints_cli.main(["verify", str(tmp_path)]) == 0
    shard = tmp_path / "checkpoint_step_6" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert checkpoints_cli.main(["verify", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("OK      step=3 checkpoint_step_3")
    assert lines[1].startswith("CORRUPT step=6 checkpoint_step_6: checkpoint_step_6/__0_0.distcp")


def test_consolidation_verifies_then_assembles_the_full_weights(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    _save(store, 3, 1.0)
    full = consolidate_checkpoint(tmp_path / "checkpoint_step_3")
    assert full["global_step"] == 1
    assert torch.equal(full["state_dict"]["w"], torch.full((4, 3), 1.0))
    (tmp_path / "checkpoint_step_3" / "meta.pt").write_bytes(b"changed")
    with pytest.raises(CheckpointCorruptError, match=r"meta\.pt"):
        consolidate_checkpoint(tmp_path / "checkpoint_step_3")


def test_consolidation_refuses_a_directory_no_history_lists(tmp_path: Path) -> None:
    dcp.save({"state_dict": {"w": torch.ones(2)}}, checkpoint_id=str(tmp_path / "loose"))
    with pytest.raises(CheckpointError, match="not listed as a sharded checkpoint"):
        consolidate_checkpoint(tmp_path / "loose")


def test_file_owners_come_from_dcp_file_names() -> None:
    assert owner_rank("__1_0.distcp") == 1
    assert owner_rank("__12_3.distcp") == 12
    assert owner_rank(".metadata") is None and owner_rank("meta.pt") is None
