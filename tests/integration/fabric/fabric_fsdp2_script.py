"""A hand-written Fabric loop with an FSDP2 model (``ModelParallelStrategy``, ``fully_shard``)
on two gloo CPU processes, guarded by `FabricRollbackGuard`; started by
`test_fabric_fsdp2_rollback.py` through `subprocess`.

Fabric's launcher re-runs the command that started rank 0 (`sys.argv`) for rank 1, so this is a
plain script, never pytest. One launch runs every scenario (importing Lightning on two ranks
dominates the time):

1. ``run``: 20 updates, a save every 3. At updates 8 and 14 rank 1 alone sees a loss spike and
   damages its own local shard of the first layer (x100), so only rank 1's state is wrong.
   At the end of update 13 rank 0 damages two newer checkpoints: one byte of rank 1's shard of
   step 12, and DCP's ``.metadata`` of step 9 replaced by a pickle that would create
   ``PICKLE_MARKER`` if it were ever unpickled.
2. ``fabric_load``: fresh objects loaded with Fabric's own ``fabric.load(dir, state)`` from
   ``checkpoint_step_18/``.
3. ``resume``: a new guard with ``resume=True`` loads the newest checkpoint (``guard.load``)
   and trains 6 more updates into the same history.
4. ``corrupt_load``: ``guard.load(state, step=12)`` is refused on both ranks.
5. ``object_store``: a guard on an fsspec memory store is refused on both ranks (DCP's file
   writer needs a POSIX path), before any rank waits on the other.

Usage: ``python fabric_fsdp2_script.py OUT_DIR``. Each rank writes ``OUT_DIR/<scenario>_rank
{r}.json`` and the local shards it held right after each rollback / load
(``OUT_DIR/<scenario>_rank{r}_<what>.pt``); the test compares them with the files.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import fsspec
import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_fragrance.checkpointing import RollbackConditions
from lightning_fragrance.fabric import FabricRollbackGuard

SAVE_EVERY = 3
UPDATES = 20
SPIKES = {8: 1, 14: 1}  # update -> the one rank that sees a spike and damages its shard
DAMAGE_AT = 13  # rank 0 damages the checkpoints of steps 12 and 9 at the end of this update
FABRIC_LOAD_FROM = 18
RESUME_UPDATES = 6
CORRUPT_STEP = 12
WIDTH = 64
PICKLE_MARKER = "unpickled_metadata_marker"


def parallelize(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2: every Linear split by rows across the data-parallel ranks, then the root."""
    dp_mesh = mesh["data_parallel"]
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def make_objects(fabric: Fabric, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1)
    )
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=1e-2))
    return {"model": model, "optimizer": optimizer, "temperature": 1.0}


def update(fabric: Fabric, state: dict[str, Any], step: int) -> float:
    generator = torch.Generator().manual_seed(1000 * step + fabric.global_rank)
    x = torch.randn(16, 8, generator=generator)
    y = torch.tanh(x.sum(dim=1, keepdim=True)) * 0.5
    loss = nn.functional.mse_loss(state["model"](x), y)
    state["optimizer"].zero_grad()
    fabric.backward(loss)
    state["optimizer"].step()
    return float(loss.detach())


def local_shards(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's local shards of the weights and of Adam's moments (``exp_avg.<name>``)."""
    module = state["model"].module if hasattr(state["model"], "module") else state["model"]
    named = dict(module.named_parameters())
    shards = {n: _local(p).detach().clone() for n, p in named.items()}
    names = {id(p): n for n, p in named.items()}
    optimizer = state["optimizer"].optimizer
    for param, moments in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            shards[f"{key}.{names[id(param)]}"] = _local(moments[key]).detach().clone()
    return shards


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def damage_own_shard(state: dict[str, Any]) -> None:
    """What rank 1 alone does at a fault: its rows of the first layer blow up."""
    module = state["model"].module if hasattr(state["model"], "module") else state["model"]
    with torch.no_grad():
        _local(module[0].weight).mul_(100.0)


def damage_checkpoints(root: Path, out: Path) -> None:
    shard = root / "checkpoint_step_12" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bomb = pickle.dumps(_Bomb(str(out / PICKLE_MARKER)))
    (root / "checkpoint_step_9" / ".metadata").write_bytes(bomb)


class _Bomb:
    """Unpickling this creates a directory: proof that a file was (not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def make_guard(fabric: Fabric, checkpoints: Path, resume: bool = False) -> FabricRollbackGuard:
    conditions = RollbackConditions(
        loss_increase_multiplier=50.0, kl_threshold=0.03, reward_drop_threshold=0.3
    )
    return FabricRollbackGuard(
        fabric,
        checkpoints,
        save_every_n_steps=SAVE_EVERY,
        max_checkpoints=20,
        rollback_conditions=conditions,
        resume=resume,
    )


def metrics(loss: float) -> dict[str, float]:
    return {"train/loss": loss, "train/reward": 1.0, "train/kl": 0.001}


def report(fabric: Fabric, guard: FabricRollbackGuard, **extra: Any) -> dict[str, Any]:
    return {
        "rank": fabric.global_rank,
        "world_size": fabric.world_size,
        "rollback_events": [
            {k: v for k, v in e.items() if isinstance(v, (str, int, float, bool))}
            for e in guard.rollback_events
        ],
        "ledger": [[e.step, e.status] for e in guard.guard.ledger],
        "run_id": guard.store.run_id,
        **extra,
    }


def run(fabric: Fabric, out: Path, checkpoints: Path) -> None:
    rank = fabric.global_rank
    state = make_objects(fabric, seed=0)
    guard = make_guard(fabric, checkpoints)
    guard.start(state)
    saved, restored = [], []
    for step in range(1, UPDATES + 1):
        loss = update(fabric, state, step)
        reading = loss
        if SPIKES.get(step) == rank:  # a fault only this rank has
            reading = loss * 1000.0
            damage_own_shard(state)
        if step == DAMAGE_AT and fabric.is_global_zero:
            damage_checkpoints(checkpoints, out)
        fabric.barrier()  # the damage is on disk before any rank judges the next spike
        outcome = guard.step(step, metrics(reading), state)
        if outcome.saved is not None:
            saved.append(step)
        if outcome.restored is not None:
            path = out / f"run_rank{rank}_restored{len(restored)}.pt"
            torch.save(local_shards(state), path)
            restored.append([step, outcome.restored.step])
    guard.close()
    result = report(fabric, guard, saved=saved, restored=restored)
    (out / f"run_rank{rank}.json").write_text(json.dumps(result))


def fabric_load(fabric: Fabric, out: Path, checkpoints: Path) -> None:
    """Fabric's own loader reads the guard's directory into fresh objects."""
    state = make_objects(fabric, seed=7)
    state["temperature"] = -1.0
    remainder = fabric.load(checkpoints / f"checkpoint_step_{FABRIC_LOAD_FROM}", state)
    rank = fabric.global_rank
    torch.save(local_shards(state), out / f"fabric_load_rank{rank}_loaded.pt")
    result = {"temperature": state["temperature"], "remainder": sorted(remainder)}
    (out / f"fabric_load_rank{rank}.json").write_text(json.dumps(result))


def resume(fabric: Fabric, out: Path, checkpoints: Path) -> None:
    rank = fabric.global_rank
    state = make_objects(fabric, seed=11)
    guard = make_guard(fabric, checkpoints, resume=True)
    record = guard.load(state)
    torch.save(local_shards(state), out / f"resume_rank{rank}_loaded.pt")
    guard.start(state, record.step)
    saved = []
    for step in range(record.step + 1, record.step + RESUME_UPDATES + 1):
        outcome = guard.step(step, metrics(update(fabric, state, step)), state)
        if outcome.saved is not None:
            saved.append(step)
    guard.close()
    result = report(fabric, guard, loaded=record.step, saved=saved)
    (out / f"resume_rank{rank}.json").write_text(json.dumps(result))


def corrupt_load(fabric: Fabric, out: Path, checkpoints: Path) -> None:
    state = make_objects(fabric, seed=13)
    before = local_shards(state)
    guard = make_guard(fabric, checkpoints, resume=True)
    refused = ""
    try:
        guard.load(state, step=CORRUPT_STEP)
    except Exception as err:  # the refusal under test; anything else fails the test's checks
        refused = f"{type(err).__name__}: {err}"
    guard.close()
    after = local_shards(state)
    untouched = (
        all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    )
    result = {"refused": refused, "untouched": untouched}
    (out / f"corrupt_load_rank{fabric.global_rank}.json").write_text(json.dumps(result))


def object_store(fabric: Fabric, out: Path) -> None:
    refused = ""
    try:
        FabricRollbackGuard(fabric, "/fsdp2-checkpoints", fs=fsspec.filesystem("memory"))
    except Exception as err:  # the refusal under test; anything else fails the test's checks
        refused = f"{type(err).__name__}: {err}"
    (out / f"object_store_rank{fabric.global_rank}.json").write_text(json.dumps(refused))


def main(out_dir: str) -> None:
    out = Path(out_dir)
    checkpoints = out / "checkpoints"
    strategy = ModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    run(fabric, out, checkpoints)
    fabric_load(fabric, out, checkpoints)
    resume(fabric, out, checkpoints)
    corrupt_load(fabric, out, checkpoints)
    object_store(fabric, out)


if __name__ == "__main__":
    main(sys.argv[1])
