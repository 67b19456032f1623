"""The guard's host memory and its save / rollback times for a >= 2 GB training state, against
torch.distributed.checkpoint's own async save and load of the same state in the same run.

Claim (issue 12 item 4): within the default budget (one extra copy of the training state) the
guard's peak extra RSS is at most 2.0x the state with the in-memory snapshot on and at most
1.0x with it off.

Method: a model of 3 Linear(8192, 8192) layers with Adam's two moments: 2.42 GB of training
state, allocated and touched before anything is measured. Each configuration runs in its own
process (so no allocator cache or page of an earlier one is counted): the peak RSS mark of the
process (VmHWM) is reset right before the measured phase by writing 5 to /proc/self/clear_refs,
and its "extra" is VmHWM minus the RSS at that moment (the interpreter, torch and the live
state). Ours: `CheckpointManager` with the default budget, two saves (the second stages into the
buffers of the first), a healthy reading that certifies the second, a loss spike and the
rollback (from the snapshot when it is on, from the verified file when it is off). Saves are
spaced by flushing the writer outside the timed region, as a save interval longer than a write
does. Blocking = the time `save_checkpoint` held the loop; rollback = `rollback()`. Anchor:
`torch.distributed.checkpoint.async_save` of {model, optimizer} state dicts (blocking = until
the call returned; the write then finishes on its thread) and `dcp.load` of the same, in place.
Files go to tmpfs (/dev/shm) so the disk (87 MB/s on the 2-core machine these were measured
on) does not dominate the run; pass a directory to use another.

Run: `python benchmarks/bench_memory_budget.py [DIR]` (~1-2 minutes, ~9 GB RAM peak).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

WIDTH, LAYERS = 8192, 3
TARGETS = {"on": 2.0, "off": 1.0}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def _peak_extra(baseline: int) -> int:
    return _status_kb("VmHWM") * 1024 - baseline


def _training_state() -> tuple[nn.Module, torch.optim.Optimizer, int]:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step allocates and touches Adam's moments
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())
    return model, optimizer, nbytes


def run_ours(directory: Path, snapshot: bool) -> dict[str, Any]:
    from lightning_fragrance.checkpointing import CheckpointManager

    model, optimizer, nbytes = _training_state()
    manager = CheckpointManager(
        str(directory), save_interval=1, max_checkpoints=1, keep_in_memory=snapshot
    )
    baseline = _reset_peak()
    blocking = []
    for step in (1, 2):
        manager.check_rollback(step, 0.5, 1.0, 0.001)
        manager.flush()  # a save interval longer than a write (outside the timing)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-6)  # training moves the weights between saves
        started = time.perf_counter()
        manager.save_checkpoint(step, model, None, optimizer, 0.5, 1.0, 0.001)
        blocking.append(time.perf_counter() - started)
    manager.check_rollback(3, 0.5, 1.0, 0.001)  # certifies step 2
    manager.flush()
    assert manager.check_rollback(4, 100.0, 1.0, 0.001).should_rollback
    started = time.perf_counter()
    restored = manager.rollback(model, None, optimizer)
    rollback = time.perf_counter() - started
    assert restored is not None and restored.step == 2
    from_memory = manager.rollback_events[-1]["from_memory"]
    manager.close()
    return {
        "state_bytes": nbytes,
        "peak_extra": _peak_extra(baseline),
        "blocking": blocking,
        "rollback": rollback,
        "from_memory": from_memory,
    }


def run_dcp(directory: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    model, optimizer, nbytes = _training_state()
    baseline = _reset_peak()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    started = time.perf_counter()
    future = dcp.async_save(state, checkpoint_id=str(directory / "dcp"), no_dist=True)
    blocking = time.perf_counter() - started
    result = getattr(future, "upload_completion", future)
    result.result()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-6)
    started = time.perf_counter()
    target = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    dcp.load(target, checkpoint_id=str(directory / "dcp"), no_dist=True)
    model.load_state_dict(target["model"])
    optimizer.load_state_dict(target["optimizer"])
    rollback = time.perf_counter() - started
    return {
        "state_bytes": nbytes,
        "peak_extra": _peak_extra(baseline),
        "blocking": [blocking],
        "rollback": rollback,
    }


def _child(config: str, directory: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", config, str(directory)],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(root: Path) -> int:
    results = {}
    for config in ("on", "off", "dcp"):
        directory = Path(tempfile.mkdtemp(prefix="lf-bench-memory-", dir=root))
        try:
            results[config] = _child(config, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    state = results["on"]["state_bytes"]
    print(f"training state: {state / 1e9:.2f} GB (3 x Linear({WIDTH}, {WIDTH}) + Adam moments)")
    print("peak extra RSS / state size (VmHWM minus the RSS before the phase):")
    for config in ("on", "off"):
        ratio = results[config]["peak_extra"] / state
        verdict = "ok" if ratio <= TARGETS[config] else "ABOVE TARGET"  # no rounding
        limit, over = TARGETS[config], (results[config]["peak_extra"] - state) / 1e6
        print(
            f"  ours, snapshot {config:3s}: {ratio:6.3f}x ({over:+.0f} MB beside one copy)   "
            f"target <= {limit:.1f}x  {verdict}"
        )
    print(f"  anchor dcp.async_save + dcp.load: {results['dcp']['peak_extra'] / state:6.3f}x")
    dcp_block, dcp_load = results["dcp"]["blocking"][0], results["dcp"]["rollback"]
    for config in ("on", "off"):
        first, steady = results[config]["blocking"]
        print(
            f"save blocking, snapshot {config}: first {first:.3f} s, second {steady:.3f} s; "
            f"dcp.async_save {dcp_block:.3f} s; ratio (second / dcp) {steady / dcp_block:.2f}x"
        )
    for config in ("on", "off"):
        ours = results[config]["rollback"]
        source = "memory" if results[config]["from_memory"] else "file"
        print(
            f"rollback, snapshot {config} (from {source}): {ours:.3f} s; dcp.load "
            f"{dcp_load:.3f} s; ratio {ours / dcp_load:.2f}x"
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        where = Path(sys.argv[3])
        outcome = run_dcp(where) if sys.argv[2] == "dcp" else run_ours(where, sys.argv[2] == "on")
        print(json.dumps(outcome))
        raise SystemExit(0)
    shm = Path("/dev/shm")
    default_root = shm if shm.is_dir() else Path(tempfile.gettempdir())
    raise SystemExit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default_root))
