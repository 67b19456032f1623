"""The ``lf-checkpoints`` CLI on a real checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_fragrance.checkpointing import CheckpointStore
from lightning_fragrance.cli.checkpoints import main


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    store = CheckpointStore(str(tmp_path))
    store.claim("run-a1")
    for step in (500, 1000, 1100):
        store.commit(step, {"w": torch.ones(8) * step}, {"loss": 0.5, "reward": 20.0})
    store.set_status(1100, "rejected", note="no healthy evidence after it: the fault was detected")
    store.add_event(
        {
            "type": "rollback",
            "at_step": 1200,
            "to_step": 1000,
            "reason": "loss_spike",
            "message": "loss spike 0.50 -> 1.20 (2.40x)",
        }
    )
    return tmp_path


def test_list_prints_the_history_and_events(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "3 checkpoint(s) of run run-a1" in out
    assert "checkpoint_step_1000.ckpt" in out and "pending" in out
    assert "rejected" in out and "no healthy evidence after it" in out
    assert "loss spike 0.50 -> 1.20 (2.40x)" in out


def test_verify_reports_a_bit_flip_with_exit_status_1(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(directory)]) == 0
    path = directory / "checkpoint_step_500.ckpt"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["verify", str(directory)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT step=500" in out and "2 of 3 checkpoint(s)" in out
    # verify only reads: the history is not modified
    history = json.loads((directory / "checkpoint_history.json").read_text())
    assert {e["status"] for e in history["entries"]} == {"pending", "rejected"}


def test_pin_and_unpin_update_the_history(directory: Path) -> None:
    assert main(["pin", str(directory), "500"]) == 0
    assert CheckpointStore(str(directory)).record(500).pinned  # type: ignore[union-attr]
    assert main(["unpin", str(directory), "500"]) == 0
    assert not CheckpointStore(str(directory)).record(500).pinned  # type: ignore[union-attr]


def test_unknown_step_and_foreign_directory_are_clear_errors(
    directory: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pin", str(directory), "42"]) == 2
    assert "committed steps: [500, 1000, 1100]" in capsys.readouterr().err
    empty = tmp_path_factory.mktemp("empty")
    assert main(["list", str(empty)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
