"""Disk full in the middle of a run: training goes on, the error is reported (observers and log),
and the checkpoints committed before stay intact and usable.

Two ways to fill the disk:
* a real local directory under `RLIMIT_FSIZE`, set mid-run inside a forked training child (the
  kernel then fails writes past the limit with EFBIG, as a full disk fails them with ENOSPC);
* an fsspec filesystem whose capacity runs out (`FaultyMemoryFileSystem`, ENOSPC), the route by
  which the store reaches object stores.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from crash_harness import (
    PayloadModule,
    fork_child,
    inspect_directory,
    payload_loader,
    quiet_trainer,
)
from faulty_filesystem import FaultyMemoryFileSystem, new_faulty_filesystem

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.checkpointing import CheckpointStore, NullObserver

SAVE_EVERY = 2
FULL_AT_STEP = 5  # saves at steps 2 and 4 fit; the ones at 6, 8 and 10 do not
SPIKE_AT_STEP = 8  # KL spike seen by the callback at step 9, after the disk filled up
MAX_STEPS = 10
CHILD_TIMEOUT_S = 120.0


class RecordingObserver(NullObserver):
    """Keeps what the engine reported (called from the writer thread and the training thread)."""

    def __init__(self) -> None:
        self.saved: list[int] = []
        self.errors: list[tuple[int, BaseException]] = []

    def on_checkpoint_saved(
        self, step: int, nbytes: int, blocking_seconds: float, write_seconds: float
    ) -> None:
        self.saved.append(step)

    def on_checkpoint_error(self, step: int, error: BaseException) -> None:
        self.errors.append((step, error))


class FillDiskAt(pl.Callback):
    """Runs `fill` once, at the start of the batch trained at ``step``, after pending writes."""

    def __init__(self, step: int, guard: RollbackCheckpoint, fill: Callable[[], None]) -> None:
        self.step, self.guard, self.fill, self.done = step, guard, fill, False

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.done and trainer.global_step == self.step:
            self.done = True
            self.guard.flush()  # the saves before this point are not the ones being cut
            self.fill()


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _guard(dirpath: str, recorder: RecordingObserver, **kwargs: Any) -> RollbackCheckpoint:
    return RollbackCheckpoint(
        dirpath=dirpath,
        save_every_n_steps=SAVE_EVERY,
        max_checkpoints=5,
        loss_increase_multiplier=1e9,
        reward_drop_threshold=1e9,
        # The callback keeps its logging observer beside ours: the tests check both reports.
        observers=[recorder],
        **kwargs,
    )


def _train_into_a_file_size_limit(directory: Path, result_path: Path, log_path: Path) -> Callable:
    def body(report: Callable[[str], None]) -> int:
        # Past RLIMIT_FSIZE the kernel sends SIGXFSZ (fatal by default); ignored, the write
        # fails with EFBIG instead, which is what the writer must survive.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        handler = logging.FileHandler(log_path)
        logging.getLogger("lightning_fragrance").addHandler(handler)
        recorder = RecordingObserver()
        # No in-memory snapshot: the rollback after the disk filled up must read an old file.
        guard = _guard(str(directory), recorder, keep_in_memory=False)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # 1 MiB < one checkpoint

        trainer = quiet_trainer([FillDiskAt(FULL_AT_STEP, guard, limit), guard], MAX_STEPS)
        trainer.fit(PayloadModule(kl_spike_at=SPIKE_AT_STEP), payload_loader())
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        outcome = {
            "global_step": trainer.global_step,
            "saved": recorder.saved,
            "errors": [
                {
                    "step": step,
                    "message": str(error),
                    "errnos": [getattr(e, "errno", None) for e in _causes(error)],
                }
                for step, error in recorder.errors
            ],
            "rollbacks": [
                {k: e[k] for k in ("at_step", "to_step", "from_memory") if k in e}
                for e in guard.rollback_events
            ],
        }
        result_path.write_text(json.dumps(outcome))
        return 0

    return body


@pytest.fixture(scope="module")
def file_size_limited_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    base = tmp_path_factory.mktemp("fsize")
    directory, result_path = base / "checkpoints", base / "result.json"
    log_path, child_log = base / "guard.log", base / "child.log"
    directory.mkdir()
    child = fork_child(_train_into_a_file_size_limit(directory, result_path, log_path), child_log)
    if not child.exited_within(CHILD_TIMEOUT_S):
        child.kill_and_reap(signal.SIGKILL)  # bounded: a stuck child cannot hang the suite
        pytest.fail("the training child did not finish; its output:\n" + child_log.read_text())
    status = child.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, child_log.read_text()[-4000:]
    return directory, json.loads(result_path.read_text()), log_path.read_text()


def test_training_goes_on_to_max_steps_when_the_disk_fills_up(
    file_size_limited_run: tuple[Path, dict, str],
) -> None:
    _, outcome, _ = file_size_limited_run
    assert outcome["global_step"] == MAX_STEPS
    assert outcome["saved"] == [0, 2, 4]  # 0: the state the fit began from


def test_each_failed_write_is_reported_to_observers_and_the_log_with_its_cause(
    file_size_limited_run: tuple[Path, dict, str],
) -> None:
    _, outcome, log_text = file_size_limited_run
    assert [e["step"] for e in outcome["errors"]] == [6, 8, 10]
    for error in outcome["errors"]:
        assert errno.EFBIG in error["errnos"], error
        assert f"step={error['step']}" in log_text, log_text
    # What the operator reads must name the cause, not only the serializer's symptom.
    reason = os.strerror(errno.EFBIG)  # "File too large"
    assert all(reason in e["message"] for e in outcome["errors"]), outcome["errors"]


def test_checkpoints_committed_before_the_disk_filled_up_stay_intact_and_restorable(
    file_size_limited_run: tuple[Path, dict, str],
) -> None:
    directory, outcome, _ = file_size_limited_run
    state = inspect_directory(directory)
    assert not state.problems, state.problems
    assert not state.tmp_files, state.tmp_files
    assert [e["step"] for e in state.entries] == [0, 2, 4]
    assert state.good_steps == [0, 2, 4]
    assert not (directory / "checkpoint_step_6.ckpt").exists()
    # The spike after the disk filled up rolled back to the newest intact file.
    assert outcome["rollbacks"] == [
        {"at_step": SPIKE_AT_STEP + 1, "to_step": 4, "from_memory": False}
    ]


def test_an_fsspec_disk_that_runs_out_of_space_keeps_older_checkpoints_and_training(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fs: FaultyMemoryFileSystem = new_faulty_filesystem()
    recorder = RecordingObserver()
    guard = _guard("/run/checkpoints", recorder, fs=fs)

    def fill() -> None:
        fs.capacity = fs.used_bytes() + 1024

    trainer = quiet_trainer([FillDiskAt(FULL_AT_STEP, guard, fill), guard], MAX_STEPS)
    with caplog.at_level(logging.ERROR, logger="lightning_fragrance"):
        trainer.fit(PayloadModule(width=64), payload_loader())
    try:
        assert trainer.global_step == MAX_STEPS
        assert recorder.saved == [0, 2, 4]
        assert [step for step, _ in recorder.errors] == [6, 8, 10]
        for _, error in recorder.errors:
            assert any(getattr(e, "errno", None) == errno.ENOSPC for e in _causes(error))
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("step=6" in line for line in logged), logged
        fs.capacity = None
        store = CheckpointStore("/run/checkpoints", fs=fs, read_only=True)
        assert [r.step for r in store.records()] == [0, 2, 4]
        assert all(store.verify(r) for r in store.records())
        assert not [p for p in fs.ls("/run/checkpoints", detail=False) if p.endswith(".tmp")]
    finally:
        fs.reset()
