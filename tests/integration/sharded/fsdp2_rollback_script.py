"""Two-rank FSDP2 run (Lightning's ModelParallelStrategy, gloo, CPU) with sharded checkpoints;
started by `test_sharded_rollback.py` through `subprocess`.

Lightning's launcher re-runs the command that started rank 0 (`sys.argv`) for rank 1, so this is
a plain script, never pytest. One launch runs four scenarios (importing Lightning on two ranks
dominates the time):

1. ``run``: 22 steps, a save every 3. Rank 1 alone sees a loss spike at steps 7 and 13. Before
   the second, rank 0 damages two newer checkpoints: one byte of rank 1's shard of step 12, and
   DCP's ``.metadata`` of step 9 replaced by a pickle that would create ``PICKLE_MARKER`` if it
   were ever unpickled. The save of step 18 fails on rank 1 (`FailingWriter`, as a full disk).
2. ``resume``: a new Trainer resumes from ``checkpoint_step_21/`` for 6 more steps.
3. ``corrupt_resume``: resuming from the damaged ``checkpoint_step_12/`` is refused.

Usage: ``python fsdp2_rollback_script.py OUT_DIR``. Each rank writes ``OUT_DIR/<scenario>_rank
{r}.json`` and the local shards it held right after each rollback / at the resumed start
(``OUT_DIR/<scenario>_rank{r}_<what>.pt``); the test compares them with the files.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.futures import Future
from torch.utils.data import DataLoader, TensorDataset

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.checkpointing.sharded import default_storage_writer

SAVE_EVERY = 3
SPIKES = {7: 1, 13: 1}  # {global_step in training_step: the one rank whose loss reading spikes}
DAMAGE_AT = 13  # rank 0 damages the checkpoints of steps 12 and 9 at the end of this step
FAILED_SAVE = 18  # rank 1's write of this step's shard fails
MAX_STEPS = 22
RESUME_FROM = 21
RESUME_STEPS = 6
PICKLE_MARKER = "unpickled_metadata_marker"


class ShardedRegression(pl.LightningModule):
    """A small MLP whose every Linear is sharded by FSDP2 across the data-parallel ranks."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
        )
        self.spiked_at: list[int] = []

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        step = self.trainer.global_step
        reading = loss.detach().clone()
        if SPIKES.get(step) == self.global_rank and step not in self.spiked_at:
            self.spiked_at.append(step)
            reading = reading * 1000.0  # what this rank alone sees: a loss spike
        reward, kl = torch.tensor(1.0), torch.tensor(0.001)
        # sync_dist=False on purpose: each rank logs what it saw (a rank-local fault).
        self.log("train/loss", reading, on_step=True, on_epoch=False)
        self.log("train/reward", reward, on_step=True, on_epoch=False)
        self.log("train/kl", kl, on_step=True, on_epoch=False)
        return {"loss": loss, "train/loss": reading, "train/reward": reward, "train/kl": kl}

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def local_shards(module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """This rank's local shards of the weights and of Adam's moments (``exp_avg.<name>``)."""
    shards = {
        name: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in module.named_parameters()
    }
    optimizer = trainer.optimizers[0]
    names = {id(p): n for n, p in module.named_parameters()}
    for param, state in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            value = state[key]
            local = value.to_local() if isinstance(value, DTensor) else value
            shards[f"{key}.{names[id(param)]}"] = local.detach().clone()
    return shards


class FailingWriter(dcp.FileSystemWriter):
    """DCP's file writer, failing on rank 1 as a full disk would (mock-free: the real writer
    for every other rank and step)."""

    def write_data(self, plan: Any, planner: Any) -> Future[list[WriteResult]]:
        if torch.distributed.get_rank() == 1:
            raise OSError(28, "No space left on device (injected on rank 1)")
        return super().write_data(plan, planner)


class Probe(pl.Callback):
    """Records local shards after each rollback and at the start; damages files; injects the
    failing write. Placed before the guard: checkpoint callbacks run last in every hook."""

    def __init__(self, guard: RollbackCheckpoint, out: Path, name: str) -> None:
        self.guard, self.out, self.name = guard, out, name
        self.seen: int | None = None  # set at the first batch: a resumed run carries earlier ones
        self.start_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step
        shards = local_shards(pl_module, trainer)
        torch.save(shards, self.out / f"{self.name}_rank{trainer.global_rank}_start.pt")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        count = self.guard.rollback_count
        if self.seen is not None and count > self.seen:
            path = self.out / f"{self.name}_rank{trainer.global_rank}_restored{count - 1}.pt"
            torch.save(local_shards(pl_module, trainer), path)
        self.seen = count
        engine = self.guard.engine
        if engine is not None and engine.sharded is not None:
            # this batch's update makes step FAILED_SAVE, saved at the batch's end
            failing = trainer.global_step + 1 == FAILED_SAVE and self.name == "run"
            engine.sharded.storage_writer = FailingWriter if failing else default_storage_writer

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Runs before the guard's hook of the same step: the damage is done before the spike
        # of step DAMAGE_AT is judged (the guard's barrier orders rank 1's reads after it).
        if self.name != "run" or trainer.global_step != DAMAGE_AT or not trainer.is_global_zero:
            return
        root = Path(self.guard.store.directory)
        shard = root / "checkpoint_step_12" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        marker = self.out / PICKLE_MARKER
        (root / "checkpoint_step_9" / ".metadata").write_bytes(pickle.dumps(_Bomb(str(marker))))


class _Bomb:
    """Unpickling this creates a directory: proof that a file was (not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def make_trainer(guard: RollbackCheckpoint, probe: Probe, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps,
        callbacks=[probe, guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def make_guard(checkpoints: Path) -> RollbackCheckpoint:
    return RollbackCheckpoint(
        dirpath=checkpoints,
        save_every_n_steps=SAVE_EVERY,
        max_checkpoints=20,
        loss_increase_multiplier=50.0,
        kl_threshold=0.03,
        reward_drop_threshold=0.3,
        max_rollbacks=None,
    )


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=generator)
    y = torch.tanh(x.sum(dim=1, keepdim=True)) * 0.5
    # 32 samples, batch 4, two ranks: 4 steps per epoch (a signal no batch logs is dropped at
    # the first epoch's end; certification waits for the others)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def report(trainer: pl.Trainer, guard: RollbackCheckpoint, probe: Probe) -> dict[str, Any]:
    engine = guard.engine
    assert engine is not None
    return {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "start_step": probe.start_step,
        "global_step": trainer.global_step,
        "rollback_events": [
            {k: v for k, v in e.items() if isinstance(v, (str, int, float, bool))}
            for e in guard.rollback_events
        ],
        "ledger": [[e.step, e.status] for e in engine.guard.ledger],
        "run_id": engine.guard.run_id,
    }


def main(out_dir: str) -> None:
    out = Path(out_dir)
    checkpoints = out / "checkpoints"
    pl.seed_everything(1234, workers=True)

    guard = make_guard(checkpoints)
    probe = Probe(guard, out, "run")
    trainer = make_trainer(guard, probe, MAX_STEPS)
    trainer.fit(ShardedRegression(), loader())
    rank = trainer.global_rank
    (out / f"run_rank{rank}.json").write_text(json.dumps(report(trainer, guard, probe)))

    guard = make_guard(checkpoints)
    probe = Probe(guard, out, "resume")
    trainer = make_trainer(guard, probe, RESUME_FROM + RESUME_STEPS)
    trainer.fit(ShardedRegression(), loader(), ckpt_path=str(checkpoints / "checkpoint_step_21"))
    (out / f"resume_rank{rank}.json").write_text(json.dumps(report(trainer, guard, probe)))

    guard = make_guard(checkpoints)
    probe = Probe(guard, out, "corrupt_resume")
    trainer = make_trainer(guard, probe, 40)
    refused = ""
    try:
        damaged = str(checkpoints / "checkpoint_step_12")
        trainer.fit(ShardedRegression(), loader(), ckpt_path=damaged)
    except Exception as err:  # the refusal under test; anything else fails the test's checks
        refused = f"{type(err).__name__}: {err}"
    (out / f"corrupt_resume_rank{rank}.json").write_text(
        json.dumps({"refused": refused, "start_step": probe.start_step})
    )


if __name__ == "__main__":
    main(sys.argv[1])
