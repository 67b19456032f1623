"""Ordering between the background writer, retention and loads (issue 2: "loading waits for
pending writes"; "retention never deletes one that a pending write or a rollback depends on").

Writes and reads are held at a gate of `FaultyMemoryFileSystem` (see its docstring for why a
stand-in filesystem), so "a write is in flight" is a fact of the test, not a race it hopes for.
"""

from __future__ import annotations

import errno
import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from faulty_filesystem import FaultyMemoryFileSystem, new_faulty_filesystem
from torch import nn

from lightning_fragrance.checkpointing import (
    AsyncCheckpointWriter,
    CheckpointManager,
    CheckpointStore,
    checkpoint_file_name,
)

ROOT = "/run/checkpoints"
# Bounds a wait for something the code under test must do; a correct run never gets near it.
WAIT_S = 30.0
# How long a thread that must be blocked is given to (wrongly) finish before we look.
BLOCKED_PROBE_S = 0.3


@pytest.fixture
def fs() -> Iterator[FaultyMemoryFileSystem]:
    filesystem = new_faulty_filesystem()
    yield filesystem
    for gate in (filesystem.write_gate, filesystem.read_gate):
        if gate is not None:
            gate.set()  # never leave a writer thread parked
    filesystem.reset()


def exception_chain(error: BaseException) -> list[BaseException]:
    """The error and its causes/contexts, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _payload(step: int) -> dict[str, Any]:
    return {"step": step, "weights": torch.full((64,), float(step))}


def _ckpt(step: int) -> str:
    return f"{ROOT}/{checkpoint_file_name(step)}"


def _run_in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # handed to the test thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_retention_deletes_the_old_checkpoint_only_after_the_new_one_is_in_the_history(
    fs: FaultyMemoryFileSystem,
) -> None:
    store = CheckpointStore(ROOT, max_checkpoints=1, fs=fs)
    writer = AsyncCheckpointWriter(store)
    try:
        writer.submit(1, _payload(1), {"loss": 1.0})
        writer.flush()
        fs.write_gate = threading.Event()
        writer.submit(2, _payload(2), {"loss": 1.0})
        assert fs.write_waiting.wait(WAIT_S)

        # Step 2 is being written: step 1 is still listed, present and intact.
        assert [r.step for r in store.records()] == [1]
        assert fs.exists(_ckpt(1))
        assert store.verify(store.records()[0])

        fs.write_gate.set()
        writer.flush()
    finally:
        writer.close()
    assert writer.take_errors() == []
    assert [r.step for r in store.records()] == [2]
    ops = fs.ops
    renamed = ops.index(("mv", _ckpt(2), _ckpt(2) + ".tmp"))
    listed = next(i for i, op in enumerate(ops) if op[0] == "history" and op[2] and 2 in op[2])
    removed = ops.index(("rm", _ckpt(1), None))
    assert renamed < listed < removed, ops


def test_a_failed_write_never_costs_the_previous_checkpoint(fs: FaultyMemoryFileSystem) -> None:
    store = CheckpointStore(ROOT, max_checkpoints=1, fs=fs)
    writer = AsyncCheckpointWriter(store)
    try:
        writer.submit(1, _payload(1), {"loss": 1.0})
        writer.flush()
        fs.capacity = fs.used_bytes() + 100  # the next checkpoint does not fit
        writer.submit(2, _payload(2), {"loss": 1.0})
        writer.flush()
    finally:
        writer.close()
    errors = writer.take_errors()
    assert [e.step for e in errors] == [2]
    # The user must learn that the disk is full, not only that the zip writer choked.
    assert any(
        isinstance(e, OSError) and e.errno == errno.ENOSPC for e in exception_chain(errors[0])
    ), f"the reported error hides its cause (ENOSPC): {errors[0]!r}"
    (record,) = store.records()
    assert record.step == 1
    assert store.verify(record)
    assert torch.equal(store.load(record)["weights"], _payload(1)["weights"])
    assert not [p for p in fs.ls(ROOT, detail=False) if p.endswith(".tmp")]


def test_retention_keeps_a_checkpoint_while_a_rollback_is_reading_it(
    fs: FaultyMemoryFileSystem,
) -> None:
    store = CheckpointStore(ROOT, max_checkpoints=1, fs=fs)
    first = store.commit(1, _payload(1), {"loss": 1.0})
    fs.read_gate = threading.Event()
    reader, result = _run_in_thread(lambda: store.load(first))
    assert fs.read_waiting.wait(WAIT_S)

    # A newer commit arrives while step 1 is being read: step 1 must survive it.
    store.commit(2, _payload(2), {"loss": 1.0})
    assert fs.exists(_ckpt(1))

    fs.read_gate.set()
    reader.join(WAIT_S)
    assert "error" not in result, result.get("error")
    assert torch.equal(result["value"]["weights"], _payload(1)["weights"])
    # Once nothing depends on it any more, the next commit applies retention.
    store.commit(3, _payload(3), {"loss": 1.0})
    assert [r.step for r in store.records()] == [3]
    assert not fs.exists(_ckpt(1))


def _nets() -> tuple[nn.Linear, nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    policy, value = nn.Linear(8, 4), nn.Linear(8, 1)
    optimizer = torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=1e-2)
    return policy, value, optimizer


def _train_step(policy: nn.Module, value: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(16, 8)
    loss = policy(x).pow(2).mean() + value(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_rollback_from_file_waits_for_the_pending_write_of_its_target(
    fs: FaultyMemoryFileSystem,
) -> None:
    manager = CheckpointManager(
        ROOT, save_interval=5, max_checkpoints=3, fs=fs, keep_in_memory=False, observers=[]
    )
    policy, value, optimizer = _nets()
    try:
        _train_step(policy, value, optimizer)
        manager.save_checkpoint(5, policy, value, optimizer, loss=0.5, reward=20.0)
        manager.flush()
        _train_step(policy, value, optimizer)
        fs.write_gate = threading.Event()
        manager.save_checkpoint(10, policy, value, optimizer, loss=0.5, reward=20.0)
        saved_at_10 = {k: v.clone() for k, v in policy.state_dict().items()}
        assert fs.write_waiting.wait(WAIT_S)
        _train_step(policy, value, optimizer)  # the weights move on

        assert not manager.check_rollback(11, 0.5, 20.0).should_rollback  # 10 is known-good
        should, target, reason = manager.check_rollback(12, 1.2, 20.0)
        assert should and reason is not None and reason.code == "loss_spike"
        assert target is not None and target.step == 10
        rollback, result = _run_in_thread(lambda: manager.rollback(policy, value, optimizer))
        rollback.join(BLOCKED_PROBE_S)
        # It cannot have loaded step 10 yet: that file is still being written.
        assert rollback.is_alive(), "rollback did not wait for the pending write"
        fs.write_gate.set()
        rollback.join(WAIT_S)
    finally:
        if fs.write_gate is not None:
            fs.write_gate.set()
        manager.close()
    assert "error" not in result, result.get("error")
    assert result["value"].step == 10
    for key, tensor in policy.state_dict().items():
        assert torch.equal(tensor, saved_at_10[key]), key


def test_listing_checkpoints_waits_for_the_pending_write(fs: FaultyMemoryFileSystem) -> None:
    manager = CheckpointManager(ROOT, save_interval=5, fs=fs, observers=[])
    policy, value, optimizer = _nets()
    try:
        fs.write_gate = threading.Event()
        manager.save_checkpoint(5, policy, value, optimizer, loss=0.5, reward=20.0)
        assert fs.write_waiting.wait(WAIT_S)
        lister, result = _run_in_thread(manager.list_checkpoints)
        lister.join(BLOCKED_PROBE_S)
        assert lister.is_alive(), "list_checkpoints did not wait for the pending write"
        fs.write_gate.set()
        lister.join(WAIT_S)
    finally:
        if fs.write_gate is not None:
            fs.write_gate.set()
        manager.close()
    assert [r.step for r in result["value"]] == [5]


def test_a_third_save_waits_while_one_is_written_and_one_is_queued_then_all_commit_in_order(
    fs: FaultyMemoryFileSystem,
) -> None:
    store = CheckpointStore(ROOT, max_checkpoints=5, fs=fs)
    writer = AsyncCheckpointWriter(store)
    try:
        fs.write_gate = threading.Event()
        writer.submit(1, _payload(1), {"loss": 1.0})  # taken by the writer, held at the gate
        assert fs.write_waiting.wait(WAIT_S)
        writer.submit(2, _payload(2), {"loss": 1.0})  # queued: the one staged copy allowed
        third, result = _run_in_thread(lambda: writer.submit(3, _payload(3), {"loss": 1.0}))
        third.join(BLOCKED_PROBE_S)
        # Back-pressure: host memory holds at most two staged copies, so the trainer waits.
        assert third.is_alive(), "a third staged checkpoint was accepted while two were pending"
        fs.write_gate.set()
        third.join(WAIT_S)
        assert not third.is_alive() and "error" not in result, result
        writer.flush()
    finally:
        if fs.write_gate is not None:
            fs.write_gate.set()
        writer.close()
    assert writer.take_errors() == []
    assert [r.step for r in store.records()] == [1, 2, 3]
    renames = [op[1] for op in fs.ops if op[0] == "mv"]
    assert [p for p in renames if p.endswith(".ckpt")] == [_ckpt(1), _ckpt(2), _ckpt(3)]


def test_a_disk_that_fills_up_during_the_history_rewrite_leaves_a_readable_history(
    fs: FaultyMemoryFileSystem,
) -> None:
    store = CheckpointStore(ROOT, max_checkpoints=5, fs=fs)
    writer = AsyncCheckpointWriter(store)
    try:
        writer.submit(1, _payload(1), {"loss": 1.0})
        writer.flush()
        checkpoint_bytes = store.records()[0].bytes
        # Room for the next checkpoint file, not for the history rewrite that commits it.
        fs.capacity = fs.used_bytes() + checkpoint_bytes + 16
        writer.submit(2, _payload(2), {"loss": 1.0})
        writer.flush()
        errors = writer.take_errors()
        assert [e.step for e in errors] == [2]
        assert any(getattr(e, "errno", None) == errno.ENOSPC for e in exception_chain(errors[0]))
        # It was the history rewrite that ran out of space, after the checkpoint's rename.
        assert ("enospc", f"{ROOT}/checkpoint_history.json.tmp", None) in fs.ops, fs.ops

        # What a fresh reader (a resume, the CLI) finds: a parseable history naming only
        # intact files, with step 1 among them.
        fresh = CheckpointStore(ROOT, fs=fs, read_only=True)
        assert 1 in [r.step for r in fresh.records()]
        assert all(fresh.verify(r) for r in fresh.records())
        assert not [p for p in fs.ls(ROOT, detail=False) if p.endswith(".tmp")]

        # Space comes back: the next commit succeeds and everything it lists is intact.
        fs.capacity = None
        writer.submit(3, _payload(3), {"loss": 1.0})
        writer.flush()
    finally:
        writer.close()
    assert writer.take_errors() == []
    fresh = CheckpointStore(ROOT, fs=fs, read_only=True)
    assert {1, 3} <= {r.step for r in fresh.records()}
    assert all(fresh.verify(r) for r in fresh.records())


def test_pipelined_saves_with_reused_staging_buffers_each_write_their_own_step(
    fs: FaultyMemoryFileSystem,
) -> None:
    """Saves keep coming while earlier ones are still being written, and staging buffers are
    recycled: every file must still hold the state of its own step, and the in-memory snapshot
    must still hold the newest one."""
    # An unbounded host-memory budget: the full pipeline (snapshot, one set being written, one
    # queued). The default budget, one copy, makes each save wait for the previous write.
    manager = CheckpointManager(
        ROOT, save_interval=5, max_checkpoints=10, fs=fs, observers=[], host_memory_budget=math.inf
    )
    policy, value, optimizer = _nets()
    weights_at: dict[int, torch.Tensor] = {}

    def train_and_save(step: int) -> None:
        _train_step(policy, value, optimizer)
        weights_at[step] = policy.weight.detach().clone()
        manager.save_checkpoint(step, policy, value, optimizer, loss=0.5, reward=20.0)

    try:
        fs.write_gate = threading.Event()
        train_and_save(5)  # held in the writer at the gate
        assert fs.write_waiting.wait(WAIT_S)
        train_and_save(10)  # queued
        third, result = _run_in_thread(lambda: train_and_save(15))  # staged, waits to queue
        third.join(BLOCKED_PROBE_S)
        fs.write_gate.set()
        third.join(WAIT_S)
        assert "error" not in result, result
        for step in (20, 25, 30, 35):  # buffers of finished writes get reused from here on
            train_and_save(step)
        records = manager.list_checkpoints()
        assert [r.step for r in records] == [5, 10, 15, 20, 25, 30, 35]
        for record in records:
            stored = manager.store.load(record)["policy_state_dict"]["weight"]
            assert torch.equal(stored, weights_at[record.step]), f"step {record.step}"

        _train_step(policy, value, optimizer)
        assert not manager.check_rollback(36, 0.5, 20.0).should_rollback  # 35 is known-good
        assert manager.check_rollback(37, 1.2, 20.0).should_rollback
        restored = manager.rollback(policy, value, optimizer)
        assert restored is not None and restored.step == 35
        assert torch.equal(policy.weight, weights_at[35])
    finally:
        if fs.write_gate is not None:
            fs.write_gate.set()
        manager.close()
