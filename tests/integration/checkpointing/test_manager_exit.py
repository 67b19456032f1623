"""The operations guide's plain loop never calls `CheckpointManager.close()`: the interpreter
must not exit with the last save half-written. A real child interpreter runs the loop and exits
right after its last `save_checkpoint`, whose background write of a ~64 MB state is still in
flight; the parent then inspects the directory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

GUIDE_LOOP = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from lightning_fragrance.checkpointing import CheckpointManager

    policy = nn.Linear(4096, 4096)            # 64 MB of weights: the write takes a while
    value = nn.Linear(4, 1)
    optimizer = torch.optim.SGD([*policy.parameters(), *value.parameters()], lr=0.0)
    manager = CheckpointManager(sys.argv[1], save_interval=2, max_checkpoints=2)
    for step in range(1, 5):
        loss, reward, kl = 1.0, 10.0, 0.001
        should_rollback, checkpoint, reason = manager.check_rollback(step, loss, reward, kl)
        if should_rollback:
            manager.rollback(policy, value, optimizer)
        elif manager.should_save(step):
            manager.save_checkpoint(step, policy, value, optimizer, loss, reward, kl)
    # no manager.close(): the interpreter exits while the last write is in flight
    """
)


def test_the_guides_loop_without_close_keeps_its_last_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    completed = subprocess.run(
        [sys.executable, "-c", GUIDE_LOOP, str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not list(directory.glob("*.tmp")), "a save was left half-written at exit"
    history = json.loads((directory / "checkpoint_history.json").read_text())
    steps = [entry["step"] for entry in history["entries"]]
    assert steps[-1] == 4, steps
    last = torch.load(directory / "checkpoint_step_4.ckpt", weights_only=True)
    assert last["policy_state_dict"]["weight"].shape == (4096, 4096)
