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
