"""`lf-export` as a user runs it: a real subprocess, a real checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serving_server import REPO

from lightning_fragrance.serving.loading import ExportStore, read_current

pytestmark = [pytest.mark.integration]


def run_export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_fragrance.cli.export", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_lf_export_prints_the_new_version_and_can_point_current_at_it(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    root = tmp_path / "exports"
    done = run_export(f"ckpt_path={ppo_checkpoints[1]}", f"export_dir={root}", "make_current=true")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == root / "000001-step2"
    assert read_current(root) == "000001-step2"
    assert ExportStore(root).load("000001-step2").manifest.source_step == 2


def test_lf_export_of_a_missing_checkpoint_fails_with_a_message_and_writes_nothing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "exports"
    done = run_export(f"ckpt_path={tmp_path / 'nope.ckpt'}", f"export_dir={root}")
    assert done.returncode == 2
    assert "does not exist" in done.stderr
    assert not root.exists()


def test_lf_export_of_a_bit_flipped_store_checkpoint_exits_2_and_writes_nothing(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    import torch

    from lightning_fragrance.checkpointing.store import CheckpointStore

    checkpoints = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    payload = torch.load(ppo_checkpoints[1], map_location="cpu", weights_only=True)
    record = checkpoints.commit(2, payload, {"reward": 1.0})
    path = Path(checkpoints.path(record.file))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    root = tmp_path / "exports"

    done = run_export(f"ckpt_path={path}", f"export_dir={root}", "make_current=true")

    assert done.returncode == 2, done.stderr
    assert "fails its integrity check" in done.stderr and "CORRUPT" in done.stderr
    assert not root.exists() or not any(root.iterdir())
