"""`lf-train` end to end: a real subprocess, the real configs, a tiny step budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_fragrance.cli.train import (
    CONFIG_DIR_ENV,
    ConfigDirError,
    build_components,
    find_config_dir,
)

# Small enough for seconds per update on a shared 2-core machine; every other value comes from
# the shipped configs.
TINY = [
    "model.num_envs=4",
    "model.rollout_steps=8",
    "model.minibatch_size=16",
    "model.update_epochs=1",
    "model.hidden_sizes=[16]",
    "report.baseline_episodes=50",
    "trainer.enable_progress_bar=false",
]


def _lf_train(
    tmp_path: Path, *overrides: str, console_script: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run `python -m lightning_fragrance.cli.train`, or the installed `lf-train` script."""
    out = tmp_path / "run"
    if console_script:
        entry = [str(Path(sys.executable).parent / "lf-train")]
    else:
        entry = [sys.executable, "-m", "lightning_fragrance.cli.train"]
    command = [*entry, f"hydra.run.dir={out}", *TINY, *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170, check=False
    )


def test_lf_train_runs_end_to_end_and_writes_checkpoints_history_metrics_and_report(
    tmp_path: Path,
) -> None:
    result = _lf_train(tmp_path, "trainer.max_steps=4", "callbacks.rollback.save_every_n_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    # step 0: the state the run began from, the last-resort rollback target.
    assert checkpoints == [
        "checkpoint_step_0.ckpt",
        "checkpoint_step_2.ckpt",
        "checkpoint_step_4.ckpt",
    ]
    history = json.loads((out / "checkpoints" / "checkpoint_history.json").read_text())
    assert [e["step"] for e in history["entries"]] == [0, 2, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]
    assert {"train/reward", "train/kl", "train/loss", "train/grad_norm"} <= set(metrics[-1])
    assert (out / "training_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Report           : {out / 'training_report.png'}" in result.stdout


def test_fault_config_causes_a_rollback_recorded_in_the_history(tmp_path: Path) -> None:
    result = _lf_train(
        tmp_path,
        "experiment=fault_nan_grad",
        "callbacks.fault.at_step=5",
        "callbacks.rollback.save_every_n_steps=2",
        "trainer.max_steps=8",
        console_script=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint_history.json").read_text())
    rollbacks = [e for e in history["events"] if e.get("type") == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["at_step"] == 6
    assert rollbacks[0]["to_step"] == 4
    assert rollbacks[0]["reason"] == "non_finite"
    assert "Rollback         : at step 6 -> step 4 (non_finite)" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics[-1]["step"] == 8
    assert all(v is not None for v in metrics[-1].values()), "the run recovered to finite values"


def test_command_line_overrides_reach_the_guard_and_the_trainer(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp_path}",
                "callbacks.rollback.kl_threshold=0.05",
                "trainer.max_steps=2000",
                *TINY,
            ],
        )
    _, trainer, _, callbacks = build_components(cfg)
    guard = next(c for c in callbacks if type(c).__name__ == "RollbackCheckpoint")
    assert guard.conditions.kl_threshold == 0.05
    assert guard.conditions.baseline == "window_median"  # from rollback_ppo.yaml
    assert trainer.max_steps == 2000


def test_a_config_dir_override_without_train_yaml_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    with pytest.raises(ConfigDirError, match=f"{CONFIG_DIR_ENV}=.*has no train.yaml"):
        find_config_dir()
