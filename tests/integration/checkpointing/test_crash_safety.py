"""Crash safety: SIGKILL at random moments while checkpoints are being written never leaves the
directory in a state that a resume cannot use.

Each iteration forks a fresh training child (a real `Trainer.fit` with `RollbackCheckpoint`
saving every step a checkpoint of ~25 MB), which resumes from the newest good checkpoint, and
kills it with SIGKILL after a random delay. Saving is back to back, so the kills land inside the
temp-file write, the fsync, the rename, the history rewrite or retention. After every kill an
independent reader (plain `json`, `hashlib`) checks the directory.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from crash_harness import (
    HISTORY,
    PayloadModule,
    ReportFirstBatch,
    fork_child,
    inspect_directory,
    payload_loader,
    quiet_trainer,
)

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.checkpointing import CheckpointStore

KILLS = 24
# Long enough for several back-to-back saves of the ~25 MB payload, short enough for 24 kills in
# well under a minute. Some delays are near zero (kill right at the first save).
MAX_KILL_DELAY_S = 0.8
CHILD_START_TIMEOUT_S = 60.0


def _guard(directory: Path) -> RollbackCheckpoint:
    return RollbackCheckpoint(
        dirpath=str(directory),
        save_every_n_steps=1,
        max_checkpoints=3,
        loss_increase_multiplier=1e9,
        reward_drop_threshold=1e9,
    )


def _train_until_killed(directory: Path, resume_step: int | None) -> Callable:
    def body(report: Callable[[str], None]) -> int:
        ckpt_path = (
            None if resume_step is None else str(directory / f"checkpoint_step_{resume_step}.ckpt")
        )
        trainer = quiet_trainer([ReportFirstBatch(report), _guard(directory)], max_steps=100_000)
        trainer.fit(PayloadModule(), payload_loader(), ckpt_path=ckpt_path)
        return 0

    return body


def test_sigkill_during_saves_never_leaves_a_broken_history_and_the_run_resumes(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    rng = random.Random(20260527)
    newest_seen: int | None = None
    kills_inside_a_write = 0
    log_path = tmp_path / "children.log"
    trace: list[str] = []  # resumed step -> newest good step after the kill (* = mid-write)

    for iteration in range(KILLS):
        state = inspect_directory(directory)
        resume_step = state.newest_good_step
        child = fork_child(_train_until_killed(directory, resume_step), log_path)
        started = child.read_line(CHILD_START_TIMEOUT_S)
        if started is None:
            child.kill_and_reap(signal.SIGKILL)
            pytest.fail(
                f"iteration {iteration}: the child never reached its first batch; log:\n"
                + log_path.read_text()[-4000:]
            )
        # The resumed child starts at the step of the checkpoint it resumed from.
        assert started == f"started {resume_step or 0}", started
        time.sleep(rng.uniform(0.0, MAX_KILL_DELAY_S))
        status = child.kill_and_reap(signal.SIGKILL)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            pytest.fail(
                f"iteration {iteration}: the child ended on its own (status {status}) before "
                "the kill; log:\n" + log_path.read_text()[-4000:]
            )

        state = inspect_directory(directory)
        assert not state.problems, f"after kill {iteration}: {state.problems}"
        if newest_seen is not None:
            assert state.history_exists, f"after kill {iteration}: {HISTORY} disappeared"
            assert state.newest_good_step is not None
            # A committed checkpoint is never lost: the newest good step never goes backwards.
            assert state.newest_good_step >= newest_seen
        if state.newest_good_step is not None:
            newest_seen = state.newest_good_step
        if state.tmp_files:
            kills_inside_a_write += 1
        trace.append(f"{resume_step}->{state.newest_good_step}{'*' if state.tmp_files else ''}")

    assert newest_seen is not None, (
        "no checkpoint was ever committed; log:\n" + (log_path.read_text()[-4000:])
    )
    # Evidence that the harness exercised what it claims: some kills landed while a temp file
    # was open (the commit protocol writes `*.tmp` first).
    print(f"kills: {KILLS}, inside a write: {kills_inside_a_write}; {' '.join(trace)}")
    assert kills_inside_a_write > 0

    # A final run resumes from the newest good checkpoint, sweeps the orphan temp files and
    # carries on from that step.
    guard = _guard(directory)
    trainer = quiet_trainer([guard], max_steps=newest_seen + 2)
    trainer.fit(
        PayloadModule(),
        payload_loader(),
        ckpt_path=str(directory / f"checkpoint_step_{newest_seen}.ckpt"),
    )
    assert trainer.global_step == newest_seen + 2
    final = inspect_directory(directory)
    assert not final.problems, final.problems
    assert not final.tmp_files, final.tmp_files
    assert final.newest_good_step == newest_seen + 2
    # The engine's own reader agrees with the independent one.
    store = CheckpointStore(str(directory), read_only=True)
    assert [r.step for r in store.records()] == sorted(final.good_steps)
    assert all(store.verify(r) for r in store.records())
