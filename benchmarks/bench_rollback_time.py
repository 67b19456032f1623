"""Rollback time, from the in-memory snapshot and from the file, against a plain memory copy.

Claim (issue 2, benchmark 3): an in-memory rollback costs at most 2x a plain memory copy of the
same state (weights + Adam moments); the file rollback is printed beside it.

Method: a real `Trainer.fit` of a policy MLP with ~100 MB of training state (weights and Adam's
two moments), with a KL spike injected `ROLLBACKS` times, each a few steps after a
save. `RollbackCheckpoint` runs once with `keep_in_memory=True` and once with `False` (every
rollback then verifies the sha256 of the file and loads it). The rollback time is the wall time of
the callback's `on_train_batch_end` on the step that rolled back (trigger evaluation, restore of
weights, optimizer, scheduler and RNG, bookkeeping); pending writes are flushed at the start of
that batch, outside the measurement, so the file figure is the restore itself and not a wait for
the writer. The anchor is `Tensor.copy_` of every weight and optimizer-state tensor between
two preallocated copies (no allocation): the floor of any in-place restore. It is measured at the
start of each rolling-back batch, so every rollback is compared with a copy made moments before
under the same load; the figure is the median of the per-rollback ratios.

Run: `python benchmarks/bench_rollback_time.py` (about a minute; ~1.5 GB RAM).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.checkpointing import NullObserver

WIDTH = 2048  # 2 x Linear(2048, 2048) + head: 8.4 M parameters, ~100 MB with Adam's moments
SAVE_EVERY = 8
SPIKES = (10, 18, 26)  # each two steps after a save (8, 16, 24), which is the target
MAX_STEPS = 28
COPY_REPEATS = 7
TARGET_IN_MEMORY = 2.0


class SpikingPolicy(pl.LightningModule):
    """Two Linear(WIDTH, WIDTH) layers and a head trained with Adam; KL is 0.001 except at the
    steps of `SPIKES`, where it jumps to 1.0 (loss and reward stay tame)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh()
        )
        self.head = nn.Linear(WIDTH, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.net(x)), y)
        kl = torch.tensor(1.0 if self.trainer.global_step in SPIKES else 0.001)
        self.log("train/loss", loss.detach())
        self.log("train/reward", 1.0)
        self.log("train/kl", kl)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-5)


def state_tensors(model: pl.LightningModule) -> list[torch.Tensor]:
    """Every weight and optimizer-state tensor (Adam's moments; not the scalar step)."""
    optimizer = model.trainer.optimizers[0]
    tensors = [p.data for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    return tensors


class PlainCopy:
    """The anchor: `Tensor.copy_` between two preallocated, already touched copies of the
    training state (no allocation, nothing live is changed)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.source = [t.detach().clone() for t in tensors]
        self.target = [t.detach().clone() for t in tensors]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def seconds(self) -> float:
        samples = []
        for _ in range(COPY_REPEATS):
            started = time.perf_counter()
            for dst, src in zip(self.target, self.source, strict=True):
                dst.copy_(src)
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)


class TimedRollbackCheckpoint(RollbackCheckpoint):
    """Records the wall time of `on_train_batch_end` per global step and, at the start of each
    spiking batch, the anchor copy time (so each rollback has an anchor taken moments before it,
    under the same load of the shared machine)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hook_seconds: dict[int, float] = {}
        self.anchor_seconds: dict[int, float] = {}
        self.anchor: PlainCopy | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        started = time.perf_counter()
        super().on_train_batch_end(trainer, *args)
        self.hook_seconds[trainer.global_step] = time.perf_counter() - started

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step in SPIKES:  # this batch ends with a rollback
            self.flush()  # outside the measured hook: no rollback waits for the writer here
            if self.anchor is None:
                self.anchor = PlainCopy(state_tensors(trainer.lightning_module))
            self.anchor_seconds[trainer.global_step + 1] = self.anchor.seconds()


def rollback_ratios(keep_in_memory: bool, directory: Path) -> tuple[list[tuple[float, float]], int]:
    """(rollback seconds, anchor seconds) per rollback, and the state's size in bytes."""
    torch.manual_seed(0)
    guard = TimedRollbackCheckpoint(
        dirpath=str(directory),
        save_every_n_steps=SAVE_EVERY,
        max_checkpoints=2,
        loss_increase_multiplier=1e9,
        reward_drop_threshold=1e9,
        max_rollbacks=None,
        keep_in_memory=keep_in_memory,
        observers=[NullObserver()],
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=MAX_STEPS,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    x = torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(0))
    trainer.fit(SpikingPolicy(), DataLoader(TensorDataset(x, x[:, :1].clone()), batch_size=8))
    events = guard.rollback_events
    if len(events) != len(SPIKES):
        raise RuntimeError(f"expected {len(SPIKES)} rollbacks, got {events}")
    if any(bool(e.get("from_memory")) != keep_in_memory for e in events):
        raise RuntimeError(f"rollbacks did not come from the expected tier: {events}")
    assert guard.anchor is not None
    steps = [int(e["at_step"]) for e in events]
    pairs = [(guard.hook_seconds[s], guard.anchor_seconds[s]) for s in steps]
    return pairs, guard.anchor.nbytes


def main() -> int:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_fragrance").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="lf-bench-rollback-"))
    try:
        in_memory, nbytes = rollback_ratios(True, work / "memory")
        from_file, _ = rollback_ratios(False, work / "file")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"training state: {nbytes / 1e6:.0f} MB (weights + Adam moments), {len(SPIKES)} rollbacks"
    )
    for label, pairs in (("in-memory", in_memory), ("from file", from_file)):
        print(
            f"{label:9s}: "
            + "; ".join(f"{r * 1e3:.1f} ms vs copy {a * 1e3:.1f} ms" for r, a in pairs)
        )
    anchor = statistics.median(a for _, a in in_memory + from_file)
    memory_s = statistics.median(r for r, _ in in_memory)
    file_s = statistics.median(r for r, _ in from_file)
    print(f"anchor plain memory copy (Tensor.copy_): {anchor * 1e3:8.1f} ms (median)")
    print(f"ours in-memory rollback:                 {memory_s * 1e3:8.1f} ms")
    print(f"ours rollback from file (sha256 + load): {file_s * 1e3:8.1f} ms")
    ratio = statistics.median(r / a for r, a in in_memory)
    print(
        f"ratio in-memory / memory copy: {ratio:.2f}x (median of per-rollback ratios; target <= "
        f"{TARGET_IN_MEMORY}x) {'OK' if ratio <= TARGET_IN_MEMORY else 'MISS'}"
    )
    file_ratio = statistics.median(r / a for r, a in from_file)
    print(f"ratio from file / memory copy: {file_ratio:.2f}x (no target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
