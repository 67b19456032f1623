"""DDP consensus: a trigger seen by one rank rolls every rank back to the same checkpoint.

The run is a real `Trainer.fit` with `strategy="ddp"` on two CPU processes (gloo), started as a
standalone script (`ddp_rollback_script.py`): Lightning's DDP launcher re-runs the calling command
for rank 1, which must not be pytest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multirank import run_ranks

SCRIPT = Path(__file__).with_name("ddp_rollback_script.py")
# Two gloo ranks of a tiny MLP take 10-60 s here (importing Lightning twice on a loaded 2-core
# machine dominates; research note §3.3); the bound only stops a hang
# (mismatched collectives hang forever) from eating the whole suite.
RUN_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("ddp")
    checkpoint_dir, out_dir = base / "checkpoints", base / "out"
    checkpoint_dir.mkdir()
    out_dir.mkdir()
    code, stdout = run_ranks(
        SCRIPT, str(checkpoint_dir), str(out_dir), timeout_s=RUN_TIMEOUT_S, what="2-rank DDP run"
    )
    assert code == 0, f"DDP script failed:\n{stdout[-6000:]}"
    return checkpoint_dir, out_dir, stdout


def _report(out_dir: Path, rank: int) -> dict:
    return json.loads((out_dir / f"rank{rank}.json").read_text())


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys {sorted(a)} vs {sorted(b)}"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: tensor {key!r} differs"


def test_one_rank_triggers_roll_back_both_ranks_to_the_same_steps(
    ddp_run: tuple[Path, Path, str],
) -> None:
    _, out_dir, stdout = ddp_run
    rank0, rank1 = _report(out_dir, 0), _report(out_dir, 1)
    assert rank0["world_size"] == rank1["world_size"] == 2
    # Each spike was seen by one rank only...
    assert rank0["spiked_at"] == [8]
    assert rank1["spiked_at"] == [7]
    # ...and both ranks rolled back each time, to the same step: first to the newest save (from
    # memory), then, escalating, to the older one (from the file rank 0 wrote).
    assert rank0["rollback_count"] == rank1["rollback_count"] == 2, stdout[-4000:]
    moves0 = [(e["at_step"], e["to_step"]) for e in rank0["rollback_events"]]
    moves1 = [(e["at_step"], e["to_step"]) for e in rank1["rollback_events"]]
    assert moves0 == moves1 == [(8, 6), (9, 3)]
    assert [e["from_memory"] for e in rank0["rollback_events"]] == [True, False]
    assert [e["from_memory"] for e in rank1["rollback_events"]] == [True, False]
    # The global step kept counting through both rollbacks.
    assert rank0["global_step"] == rank1["global_step"] == 12


def test_after_each_rollback_both_ranks_hold_exactly_the_checkpoint_weights(
    ddp_run: tuple[Path, Path, str],
) -> None:
    checkpoint_dir, out_dir, _ = ddp_run
    events = _report(out_dir, 0)["rollback_events"]
    for index, event in enumerate(events):
        after0 = torch.load(out_dir / f"rank0_after_rollback{index}.pt", weights_only=True)
        after1 = torch.load(out_dir / f"rank1_after_rollback{index}.pt", weights_only=True)
        what = f"rollback {index} to step {event['to_step']}"
        _assert_same_tensors(after0, after1, f"{what}: rank 0 vs rank 1")
        checkpoint_file = checkpoint_dir / f"checkpoint_step_{event['to_step']}.ckpt"
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
        _assert_same_tensors(after0, checkpoint["state_dict"], f"{what}: rank 0 vs its file")

    # Training went on after the rollbacks and the replicas stayed in sync (DDP does not
    # re-broadcast parameters, so a rank-local restore would show up here as a difference).
    final0 = torch.load(out_dir / "rank0_final.pt", weights_only=True)
    final1 = torch.load(out_dir / "rank1_final.pt", weights_only=True)
    _assert_same_tensors(final0, final1, "rank 0 vs rank 1 at the end of the fit")


def test_ddp_history_lists_exactly_the_files_rank_zero_wrote_and_both_rollbacks(
    ddp_run: tuple[Path, Path, str],
) -> None:
    checkpoint_dir, _, _ = ddp_run
    history = json.loads((checkpoint_dir / "checkpoint_history.json").read_text())
    listed = sorted(entry["file"].rsplit("/", 1)[-1] for entry in history["entries"])
    assert listed == sorted(p.name for p in checkpoint_dir.glob("*.ckpt"))
    assert not list(checkpoint_dir.glob("*.tmp"))
    rollbacks = [
        (e["at_step"], e["to_step"]) for e in history["events"] if e.get("type") == "rollback"
    ]
    assert rollbacks == [(8, 6), (9, 3)]
