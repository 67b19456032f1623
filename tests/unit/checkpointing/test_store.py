"""CheckpointStore: atomic commits, sha256 checks, retention, pinning, fsspec URLs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from lightning_fragrance.checkpointing import (
    HISTORY_FILE,
    HISTORY_SCHEMA_VERSION,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointStatus,
    CheckpointStore,
)


def payload(step: int) -> dict[str, object]:
    return {"step": step, "weights": torch.full((64,), float(step)), "meta": {"name": "x"}}


def commit_steps(store: CheckpointStore, steps: range | list[int]) -> None:
    for step in steps:
        store.commit(step, payload(step), {"loss": 1.0 / (step + 1), "reward": float(step)})


def test_commit_writes_file_and_history_with_schema_version(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    record = store.commit(10, payload(10), {"loss": 0.5, "reward": 20.0})
    assert (tmp_path / "checkpoint_step_10.ckpt").is_file()
    doc = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert doc["schema_version"] == HISTORY_SCHEMA_VERSION
    assert doc["entries"][0]["sha256"] == record.sha256
    assert doc["entries"][0]["metrics"] == {"loss": 0.5, "reward": 20.0}
    assert record.bytes == (tmp_path / "checkpoint_step_10.ckpt").stat().st_size
    assert not list(tmp_path.glob("*.tmp"))


def test_sha256_is_that_of_the_file_bytes(tmp_path: Path) -> None:
    import hashlib

    record = CheckpointStore(str(tmp_path)).commit(3, payload(3), {})
    data = (tmp_path / record.file).read_bytes()
    assert hashlib.sha256(data).hexdigest() == record.sha256


def test_load_round_trips_with_weights_only(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    record = store.commit(7, payload(7), {})
    loaded = store.load(record)
    assert torch.equal(loaded["weights"], torch.full((64,), 7.0))
    torch.load(tmp_path / record.file, weights_only=True)  # plain torch.load works too


def test_reopening_a_directory_keeps_the_history(tmp_path: Path) -> None:
    commit_steps(CheckpointStore(str(tmp_path)), [1, 2])
    assert CheckpointStore(str(tmp_path)).steps() == [1, 2]


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_damaged_file_fails_verification_and_is_marked_corrupt(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(str(tmp_path))
    record = store.commit(5, payload(5), {})
    path = tmp_path / record.file
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    assert not store.verify(record)
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint_step_5\.ckpt"):
        store.load(record)
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert history["entries"][0]["status"] == "corrupt"


def test_retention_keeps_exactly_max_unpinned_and_pinned_do_not_count(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), max_checkpoints=3)
    commit_steps(store, [1, 2])
    store.pin(1)
    commit_steps(store, range(3, 20))
    records = store.records()
    unpinned = [r.step for r in records if not r.pinned]
    assert unpinned == [17, 18, 19]
    assert [r.step for r in records if r.pinned] == [1]
    on_disk = sorted(int(p.stem.split("_")[-1]) for p in tmp_path.glob("checkpoint_step_*.ckpt"))
    assert on_disk == [1, 17, 18, 19]


def test_unpinned_checkpoint_is_retired_at_the_next_commit(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), max_checkpoints=1)
    commit_steps(store, [1])
    store.pin(1)
    commit_steps(store, [2])
    store.unpin(1)
    commit_steps(store, [3])
    assert store.steps() == [3]


def test_retention_never_deletes_the_newest_certified(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), max_checkpoints=2)
    store.commit(1, payload(1), {}, CheckpointStatus.CERTIFIED)
    for step in (2, 3, 4):
        store.commit(step, payload(step), {}, CheckpointStatus.PENDING)
    assert store.steps() == [1, 3, 4]


def test_retention_never_deletes_a_checkpoint_being_restored(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), max_checkpoints=1)
    commit_steps(store, [1])
    with store.protect(1):
        commit_steps(store, [2, 3])
        assert store.steps() == [1, 3]
        assert (tmp_path / "checkpoint_step_1.ckpt").exists()
    commit_steps(store, [4])
    assert store.steps() == [4]


def test_orphan_tmp_files_are_swept_when_the_directory_is_opened(tmp_path: Path) -> None:
    commit_steps(CheckpointStore(str(tmp_path)), [1])
    (tmp_path / "checkpoint_step_2.ckpt.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "checkpoint_history.json.tmp").write_bytes(b"{")
    store = CheckpointStore(str(tmp_path))
    assert not list(tmp_path.glob("*.tmp"))
    assert store.steps() == [1]


def test_read_only_store_does_not_sweep_or_write(tmp_path: Path) -> None:
    commit_steps(CheckpointStore(str(tmp_path)), [1])
    orphan = tmp_path / "checkpoint_step_2.ckpt.tmp"
    orphan.write_bytes(b"in progress on rank 0")
    reader = CheckpointStore(str(tmp_path), read_only=True)
    assert orphan.exists() and reader.steps() == [1]
    with pytest.raises(CheckpointError, match="read-only"):
        reader.commit(3, payload(3), {})


def test_unparseable_history_gives_an_actionable_error(tmp_path: Path) -> None:
    (tmp_path / HISTORY_FILE).write_text('{"schema_version": 1, "entries": [')
    with pytest.raises(CheckpointError, match=r"not valid JSON.*move it away"):
        CheckpointStore(str(tmp_path))


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / HISTORY_FILE).write_text(json.dumps({"schema_version": 99, "entries": []}))
    with pytest.raises(CheckpointError, match="schema_version 99"):
        CheckpointStore(str(tmp_path))


def test_pin_of_unknown_step_lists_committed_steps(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    commit_steps(store, [5])
    with pytest.raises(CheckpointError, match=r"step 6.*\[5\]"):
        store.pin(6)


def test_events_are_appended_to_the_history(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.add_event({"type": "rollback", "at_step": 12, "to_step": 10, "reason": "kl_spike"})
    doc = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert doc["events"][0]["to_step"] == 10


def test_memory_filesystem_url_works_end_to_end() -> None:
    url = f"memory://lf-{uuid.uuid4().hex}/ckpts"
    store = CheckpointStore(url, max_checkpoints=2)
    commit_steps(store, [1, 2, 3])
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url.removeprefix("memory://"), detail=False))
    assert names == [HISTORY_FILE, "checkpoint_step_2.ckpt", "checkpoint_step_3.ckpt"]
    reopened = CheckpointStore(url)
    record = reopened.record(3)
    assert record is not None and reopened.verify(record)
    assert torch.equal(reopened.load(record)["weights"], torch.full((64,), 3.0))
    assert store.url(record.file).startswith("memory://")


def test_a_history_written_before_run_ids_is_adopted_on_resume_and_refused_otherwise(
    tmp_path: Path,
) -> None:
    from lightning_fragrance.checkpointing import CheckpointDirectoryError

    store = CheckpointStore(str(tmp_path))
    store.commit(5, {"w": torch.ones(2)}, {"loss": 1.0})
    doc = json.loads((tmp_path / "checkpoint_history.json").read_text())
    doc.pop("run_id")  # what version 1 wrote
    doc["schema_version"] = 1
    for entry in doc["entries"]:
        entry.pop("run_id")
    (tmp_path / "checkpoint_history.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointDirectoryError, match="a run from before run ids"):
        CheckpointStore(str(tmp_path)).claim("new-run")
    resumed = CheckpointStore(str(tmp_path))
    resumed.claim("new-run", resume=True)
    assert resumed.run_id == "new-run"
    assert [r.run_id for r in CheckpointStore(str(tmp_path)).records()] == ["new-run"]
