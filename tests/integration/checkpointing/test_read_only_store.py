"""A checkpoint store on a really read-only filesystem (a read-only bind mount made by the test,
as root), and `lf-checkpoints verify` running the loader's own safe-load check.

Opening a store read-only (inspection, export, rolling back from it) works there: list, verify,
load and rollback from file; every write answers a clear error. A run that loses write access
mid-run reports the failed history writes and goes on.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_fragrance.checkpointing import (
    CheckpointDirectoryError,
    CheckpointError,
    CheckpointManager,
    CheckpointStore,
    NullObserver,
)
from lightning_fragrance.cli.checkpoints import main as lf_checkpoints


def nets() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    policy, value = nn.Linear(4, 2), nn.Linear(4, 1)
    return policy, value, torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=1e-2)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(writable source, read-only view of it) through a read-only bind mount."""
    source, view = tmp_path / "source", tmp_path / "view"
    source.mkdir()
    view.mkdir()
    try:
        _mount("--bind", str(source), str(view))
        _mount("-o", "remount,ro,bind", str(view))
    except (OSError, subprocess.CalledProcessError) as err:
        if os.environ.get("CI"):  # CI runs as root: a missing capability is a failure there
            pytest.fail(f"cannot make a read-only bind mount: {err}")
        pytest.skip(f"a read-only bind mount needs root: {err}")
    try:
        yield source, view
    finally:
        subprocess.run(["umount", str(view)], check=False, capture_output=True)


def fill(directory: Path) -> None:
    """Two known-good checkpoints and the orphan of an interrupted write."""
    policy, value, optimizer = nets()
    with CheckpointManager(str(directory), save_interval=5) as manager:
        for step in (5, 10):
            manager.save_checkpoint(step, policy, value, optimizer, loss=0.5, reward=20.0)
            manager.check_rollback(step + 1, 0.5, 20.0)
    (directory / "checkpoint_step_15.ckpt.tmp").write_bytes(b"half a checkpoint")


def test_a_read_only_store_lists_verifies_loads_and_rolls_back_and_refuses_writes(
    read_only_mount: tuple[Path, Path],
) -> None:
    source, view = read_only_mount
    fill(source)
    policy, value, optimizer = nets()
    with pytest.raises(CheckpointDirectoryError, match=r"read_only=True"):
        CheckpointManager(str(view), save_interval=5, resume=True)
    manager = CheckpointManager(str(view), save_interval=5, read_only=True, async_save=False)
    assert [r.step for r in manager.list_checkpoints()] == [5, 10]
    assert all(manager.store.check(r) is None for r in manager.list_checkpoints())
    stable = manager.find_stable_checkpoint(20)
    assert stable is not None and stable.step == 10
    assert manager.check_rollback(20, 9.0, 20.0).should_rollback
    restored = manager.rollback(policy, value, optimizer)
    assert restored is not None and restored.step == 10
    saved = torch.load(view / "checkpoint_step_10.ckpt", weights_only=True)
    assert torch.equal(policy.weight, saved["policy_state_dict"]["weight"])
    with pytest.raises(CheckpointError, match=r"read_only=True.*cannot be saved"):
        manager.save_checkpoint(25, policy, value, optimizer, loss=0.5, reward=20.0)
    manager.close()
    with pytest.raises(CheckpointError, match="read-only"):
        CheckpointStore(str(view), read_only=True).pin(10)


def test_lf_checkpoints_reads_a_read_only_store_and_pin_exits_2_with_a_message(
    read_only_mount: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, view = read_only_mount
    fill(source)
    assert lf_checkpoints(["list", str(view)]) == 0
    assert lf_checkpoints(["verify", str(view)]) == 0
    capsys.readouterr()
    assert lf_checkpoints(["pin", str(view), "10"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Read-only file system" in err


class Errors(NullObserver):
    def __init__(self) -> None:
        self.errors: list[tuple[int, BaseException]] = []

    def on_checkpoint_error(self, step: int, error: BaseException) -> None:
        self.errors.append((step, error))


def test_losing_write_access_mid_run_reports_errors_and_the_rollback_still_happens(
    tmp_path: Path,
) -> None:
    source, view = tmp_path / "source", tmp_path / "view"
    source.mkdir()
    view.mkdir()
    try:
        _mount("--bind", str(source), str(view))
    except (OSError, subprocess.CalledProcessError) as err:
        if os.environ.get("CI"):
            pytest.fail(f"cannot bind mount: {err}")
        pytest.skip(f"a bind mount needs root: {err}")
    try:
        errors = Errors()
        policy, value, optimizer = nets()
        manager = CheckpointManager(
            str(view), save_interval=5, async_save=False, observers=[errors]
        )
        manager.save_checkpoint(5, policy, value, optimizer, loss=0.5, reward=20.0)
        manager.check_rollback(6, 0.5, 20.0)
        saved = policy.weight.detach().clone()
        with torch.no_grad():
            policy.weight.add_(3.0)
        _mount("-o", "remount,ro,bind", str(view))  # the disk goes read-only under the run
        assert manager.check_rollback(7, 9.0, 20.0).should_rollback
        restored = manager.rollback(policy, value, optimizer)  # its event cannot be written
        assert restored is not None and restored.step == 5
        assert torch.equal(policy.weight, saved)
        assert errors.errors and all(isinstance(e, OSError) for _, e in errors.errors)
        manager.close()
    finally:
        subprocess.run(["umount", str(view)], check=False, capture_output=True)


class Payload:
    """Would run code when unpickled without weights_only (it must never be)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, (f"pickle payload ran {uuid.uuid4().hex}",))


def test_verify_refuses_a_pickle_payload_whose_sha256_matches_the_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = CheckpointStore(str(tmp_path))
    store.commit(5, {"w": torch.ones(2)}, {"loss": 0.5})
    store.commit(10, {"w": torch.ones(2), "evil": Payload()}, {"loss": 0.5})  # hash matches
    assert lf_checkpoints(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "OK      step=5" in out
    assert "CORRUPT step=10" in out and "weights_only" in out
    assert "pickle payload ran" not in out
