"""CurrentSync: one model line following its CURRENT, without FastAPI (real exports, real loads)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_fragrance.labels import ReloadResult
from lightning_fragrance.serving.current_sync import CurrentSync, FsspecPointer
from lightning_fragrance.serving.hot_reload import HotReloadManager
from lightning_fragrance.serving.loading import (
    WEIGHTS_FILE,
    ExportStore,
    LoadedModel,
    export,
    read_current,
    write_current,
)


def make_line(
    root: Path, manager_options: dict[str, Any] | None = None, **kwargs: Any
) -> CurrentSync:
    store = ExportStore(root)
    manager: HotReloadManager[LoadedModel] = HotReloadManager(
        store.load, warmup_steps=0, **(manager_options or {})
    )
    return CurrentSync(store, manager, **kwargs)


def two_exports(root: Path, checkpoints: list[Path]) -> tuple[str, str]:
    first = export(checkpoints[0], root, make_current=True).name
    return first, export(checkpoints[1], root).name


async def follow_until(
    sync: CurrentSync, follow: str, done: Callable[[], bool], timeout: float = 30.0
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(getattr(sync, follow)(stop, 0.05))
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert done(), "the line did not follow its pointer"


def test_a_line_polls_a_current_object_behind_an_fsspec_url(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    first, second = two_exports(tmp_path / "exports", ppo_checkpoints)
    pointer = FsspecPointer(f"memory://lf-{uuid.uuid4().hex}/exports/CURRENT")
    pointer.write(first)
    sync = make_line(tmp_path / "exports", pointer=pointer)
    assert sync.start().version == first

    pointer.write(second)
    asyncio.run(follow_until(sync, "poll", lambda: sync.manager.current_version == second))
    assert read_current(tmp_path / "exports") == first  # the local file was never the pointer


def test_an_admin_reload_writes_the_lines_own_pointer(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    first, second = two_exports(tmp_path / "exports", ppo_checkpoints)
    pointer = FsspecPointer(f"memory://lf-{uuid.uuid4().hex}/CURRENT")
    pointer.write(first)
    sync = make_line(tmp_path / "exports", pointer=pointer)
    sync.start()
    record = sync.reload(second)
    assert record.done.wait(30) and record.result is ReloadResult.SUCCESS
    assert pointer.read() == second


def test_two_model_lines_each_follow_their_own_current(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    _, policy_second = two_exports(tmp_path / "policy", ppo_checkpoints)
    brief_first, _ = two_exports(tmp_path / "brief", ppo_checkpoints)
    policy = make_line(tmp_path / "policy", name="policy")
    brief = make_line(tmp_path / "brief", name="brief")
    policy.start()
    brief.start()

    write_current(tmp_path / "policy", policy_second)
    asyncio.run(
        follow_until(policy, "watch", lambda: policy.manager.current_version == policy_second)
    )
    assert brief.reconcile() is None
    assert (policy.manager.current_version, brief.manager.current_version) == (
        policy_second,
        brief_first,
    )


def test_a_version_that_failed_here_is_not_retried_by_the_follower_but_an_admin_may(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    first, second = two_exports(tmp_path / "exports", ppo_checkpoints)
    (tmp_path / "exports" / second / WEIGHTS_FILE).unlink()
    sync = make_line(tmp_path / "exports")
    sync.start()
    write_current(tmp_path / "exports", second)

    record = sync.reconcile()
    assert record is not None and record.done.wait(30)
    assert record.result is ReloadResult.LOAD_FAILED
    assert sync.reconcile() is None  # remembered: no reload loop on a broken export
    assert sync.manager.current_version == first

    retry = sync.reload(second)
    assert retry.done.wait(30) and retry.result is ReloadResult.LOAD_FAILED


@pytest.mark.parametrize("content", [b"x" * 5000, b"../../etc\n", b"\xff\xfe\n"])
def test_an_fsspec_pointer_that_is_not_a_version_name_reads_as_none(content: bytes) -> None:
    pointer = FsspecPointer(f"memory://lf-{uuid.uuid4().hex}/CURRENT")
    pointer.fs.pipe_file(pointer.path, content)
    assert pointer.read() is None


def test_an_automatic_revert_points_current_back_so_the_follower_does_not_undo_it(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    first, second = two_exports(tmp_path / "exports", ppo_checkpoints)
    options = {"keep_previous_s": 30.0, "revert_error_rate": 0.5, "revert_min_requests": 4}
    sync = make_line(tmp_path / "exports", options)
    sync.start()
    assert sync.reload(second).done.wait(30)
    assert read_current(tmp_path / "exports") == second

    def broken(model: LoadedModel) -> None:
        raise ValueError("the new policy's answers cannot be decoded")

    for _ in range(4):
        with pytest.raises(ValueError):
            sync.manager.serve(broken)
    deadline = time.monotonic() + 30
    while read_current(tmp_path / "exports") != first and time.monotonic() < deadline:
        time.sleep(0.02)

    assert read_current(tmp_path / "exports") == first
    assert sync.manager.current_version == first
    assert sync.reconcile() is None  # nothing to follow: the failing version stays out
