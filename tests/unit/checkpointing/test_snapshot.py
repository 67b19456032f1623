"""stage_to_cpu copies for real; the background writer is ordered, bounded and never silent."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from lightning_fragrance.checkpointing import (
    AsyncCheckpointWriter,
    CheckpointStore,
    CheckpointWriteError,
    NullObserver,
    StagingPool,
    stage_to_cpu,
)


def test_stage_to_cpu_never_aliases_optimizer_state() -> None:
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(4)
    optimizer.step()
    live = optimizer.state_dict()
    staged = stage_to_cpu({"optimizer": live, "nested": [param.data, (param.data,)]})
    before = staged["optimizer"]["state"][0]["exp_avg"].clone()
    param.grad = torch.full((4,), 5.0)
    optimizer.step()  # mutates exp_avg in place
    assert torch.equal(staged["optimizer"]["state"][0]["exp_avg"], before)
    assert staged["nested"][0].data_ptr() != param.data.data_ptr()
    assert staged["nested"][1][0].data_ptr() != param.data.data_ptr()
    assert staged["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_writer_commits_in_submission_order_and_flush_waits(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), max_checkpoints=10)
    writer = AsyncCheckpointWriter(store)
    for step in (1, 2, 3):
        writer.submit(step, {"w": torch.full((8,), float(step))}, {"loss": float(step)})
        writer.run_later(step, lambda s=step: store.add_event({"type": "mark", "at_step": s}))
    writer.flush()
    assert store.steps() == [1, 2, 3]
    assert [e["at_step"] for e in store.events()] == [1, 2, 3]
    assert writer.pending == 0
    writer.close()


def test_at_most_one_staged_checkpoint_waits(controlled_fs: Any) -> None:
    store = CheckpointStore("/run", fs=controlled_fs)
    writer = AsyncCheckpointWriter(store)
    controlled_fs.gate.clear()  # the disk stalls
    writer.submit(1, {"w": torch.zeros(2)}, {})  # being written (blocked)
    writer.submit(2, {"w": torch.zeros(2)}, {})  # waits in the queue
    third = threading.Thread(target=writer.submit, args=(3, {"w": torch.zeros(2)}, {}))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive(), "a third staged checkpoint must wait for a free slot"
    controlled_fs.gate.set()
    third.join()
    writer.flush()
    assert store.steps() == [1, 2, 3]
    writer.close()


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.saved: list[int] = []

    def on_checkpoint_saved(
        self, step: int, nbytes: int, blocking_seconds: float, write_seconds: float
    ) -> None:
        assert nbytes > 0 and write_seconds >= 0
        self.saved.append(step)


def test_disk_full_is_reported_once_and_older_checkpoints_stay_intact(
    controlled_fs: Any,
) -> None:
    store = CheckpointStore("/run", fs=controlled_fs)
    recorder = Recorder()
    writer = AsyncCheckpointWriter(store, [recorder])
    writer.submit(1, {"w": torch.ones(16)}, {"loss": 1.0})
    writer.flush()
    controlled_fs.disk_full = True
    writer.submit(2, {"w": torch.ones(16)}, {"loss": 2.0})
    writer.flush()
    errors = writer.take_errors()
    assert [type(e) for e in errors] == [CheckpointWriteError]
    assert errors[0].step == 2 and "No space left" in str(errors[0])
    assert writer.take_errors() == []  # each error is handed out once
    assert recorder.saved == [1]
    assert store.steps() == [1]
    record = store.record(1)
    assert record is not None and store.verify(record)
    assert not [p for p in controlled_fs.store if p.endswith(".tmp")]
    controlled_fs.disk_full = False
    writer.submit(3, {"w": torch.ones(16)}, {})  # the writer keeps working afterwards
    writer.close()
    assert store.steps() == [1, 3]


def test_stage_into_reuses_buffers_of_matching_shape_only() -> None:
    first = stage_to_cpu({"w": torch.ones(4), "b": torch.ones(2), "n": 1})
    buffer = first["w"]
    second = stage_to_cpu({"w": torch.full((4,), 2.0), "b": torch.ones(3), "n": 2}, into=first)
    assert second["w"] is buffer and torch.equal(buffer, torch.full((4,), 2.0))
    assert second["b"].shape == (3,) and second["n"] == 2


def test_staging_pool_never_reuses_the_snapshot_or_an_unwritten_copy() -> None:
    pool = StagingPool()
    live = {"w": torch.zeros(8)}
    snapshot, release_snapshot = pool.stage(live)
    release_snapshot()  # written, but it is still the in-memory snapshot
    live["w"].fill_(1.0)
    writing, _ = pool.stage(live, keep=snapshot)  # never released: still being written
    assert writing["w"] is not snapshot["w"]
    live["w"].fill_(2.0)
    third, _ = pool.stage(live, keep=writing)
    # The snapshot's buffers were free (released, no longer kept): reused; the others untouched.
    assert third["w"] is snapshot["w"]
    assert torch.equal(writing["w"], torch.ones(8))
    assert torch.equal(third["w"], torch.full((8,), 2.0))
