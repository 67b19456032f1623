"""A multi-rank run whose checkpoint path names a different directory on each rank is refused
at the start, on every rank, with what to do: rank 0 writes every checkpoint and the others read
its files on a rollback that does not come from memory, so on node-local disks the first such
rollback would fail in the middle of a recovery (`checkpointing/shared_view.py`).

Two real gloo ranks on one machine stand in for two nodes: each rank runs in its own folder and
the guard gets a relative path, so the same string names two directories (as `/local/ckpt` does
on two machines). The shared case is every other multi-rank test (they pass the same check).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multirank import run_ranks

SCRIPT = Path(__file__).with_name("ddp_unshared_dir_script.py")
RUN_TIMEOUT_S = 150  # stops a hang (ranks disagreeing on a collective), not a slow run


def _run(mode: str, out: Path) -> list[str]:
    _, stdout = run_ranks(
        SCRIPT, mode, str(out), timeout_s=RUN_TIMEOUT_S, what=f"2-rank {mode} run"
    )
    results = [out / f"rank{rank}.json" for rank in (0, 1)]
    missing = [str(p) for p in results if not p.exists()]
    assert not missing, f"no result from {missing}; output:\n{stdout[-4000:]}"
    return [str(json.loads(p.read_text())["error"]) for p in results]


@pytest.mark.parametrize("mode", ["trainer", "fabric"])
def test_every_rank_refuses_a_directory_that_is_not_shared(mode: str, tmp_path: Path) -> None:
    errors = _run(mode, tmp_path)

    for rank, error in enumerate(errors):
        assert error.startswith("CheckpointDirectoryError"), (rank, error)
        assert "rank(s) 1 of 2 do not see the checkpoint history" in error, error
        assert "shared by all nodes" in error and "s3://" in error, error
    # Rank 0 claimed its own folder; nothing was saved anywhere before the refusal.
    assert (tmp_path / "node0" / "checkpoints" / "checkpoint_history.json").exists()
    assert not list(tmp_path.rglob("*.ckpt"))
