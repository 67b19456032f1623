"""`python -m lightning_fragrance.examples.guarded_toy`, the fallback main job of `make demo`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lightning_fragrance.examples.guarded_toy import main


def test_guarded_toy_shows_save_trigger_rollback_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="lightning_fragrance")
    directory = tmp_path / "ckpts"
    args = ["--dir", str(directory), "--steps", "16", "--save-every", "5", "--diverge-at", "11"]
    assert main(args) == 0
    messages = [r.getMessage() for r in caplog.records]
    # The save's line comes from the background writer: on a loaded machine it may land after
    # the trigger (the rollback itself reads the in-memory copy and does not wait for it).
    assert any(m.startswith("Checkpoint saved: step=10") for m in messages)
    order = [
        next(i for i, m in enumerate(messages) if m.startswith(prefix))
        for prefix in (
            "Rollback triggered: loss spike",
            "Rolled back to step=10",
            "Recovery: step=13",
        )
    ]
    assert order == sorted(order)
    out = capsys.readouterr().out
    assert f"History:     {directory / 'checkpoint_history.json'}" in out
    history = json.loads((directory / "checkpoint_history.json").read_text())
    assert [e["to_step"] for e in history["events"]] == [10]


def test_guarded_toy_refuses_a_directory_with_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoint_history.json").write_text("{}")
    assert main(["--dir", str(tmp_path)]) == 2
