"""Training throughput with the guard on, against Lightning's own checkpointing.

Claim (issue 2, benchmark 1): a small model trained with `RollbackCheckpoint` saving every 50 steps
runs at >= 0.98x the steps/s of the same Trainer with `ModelCheckpoint(every_n_train_steps=50)`.
The run without any checkpointing is printed as the ceiling.

Method: one process, the three configurations interleaved in rounds (the order rotates each round,
so a slow phase of the shared 2-core machine hits all three alike); each run is a fresh Trainer and
model. Steps/s is measured from the first batch to the return of `fit` (so our background writer's
final flush is paid inside the measurement), over `STEPS - 1` steps. The figure is the median over
the rounds of the per-round ratio, with the medians of the steps/s as context. Steps per CPU
second of the process (all threads) are printed too: on a shared machine they swing less.

Run: `python benchmarks/bench_guard_overhead.py` (about a minute).
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
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fragrance.callbacks import RollbackCheckpoint

STEPS = 300
SAVE_EVERY = 50
ROUNDS = 7
TARGET = 0.98
CONFIGS = ("none", "modelcheckpoint", "ours")


class SmallPolicy(pl.LightningModule):
    """A small MLP (~50k parameters) logging the three signals the guard reads."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh())
        self.head = nn.Linear(128, 4)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.net(x)), y)
        self.log("train/loss", loss.detach())
        self.log("train/reward", 1.0)
        self.log("train/kl", 0.001)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class FirstBatchClock(pl.Callback):
    """Remembers when the first batch started (Trainer setup is not part of the figure): wall
    time, and CPU time of the whole process (all threads, our background writer included)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.cpu_started = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        if self.started is None:
            self.started = time.perf_counter()
            self.cpu_started = time.process_time()


def steps_per_second(config: str, loader: DataLoader, directory: Path) -> tuple[float, float]:
    """Steps per wall second and steps per CPU second of one fresh fit."""
    clock = FirstBatchClock()
    callbacks: list[pl.Callback] = [clock]
    if config == "modelcheckpoint":
        callbacks.append(ModelCheckpoint(dirpath=str(directory), every_n_train_steps=SAVE_EVERY))
    elif config == "ours":
        callbacks.append(RollbackCheckpoint(dirpath=str(directory), save_every_n_steps=SAVE_EVERY))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=config != "none",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(0)
    trainer.fit(SmallPolicy(), loader)
    elapsed = time.perf_counter() - (clock.started or 0.0)
    cpu = time.process_time() - clock.cpu_started
    return (STEPS - 1) / elapsed, (STEPS - 1) / cpu


def main() -> int:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=generator)
    loader = DataLoader(TensorDataset(x, x[:, :4].clone()), batch_size=32, shuffle=True)
    rates: dict[str, list[float]] = {c: [] for c in CONFIGS}
    cpu_rates: dict[str, list[float]] = {c: [] for c in CONFIGS}
    work = Path(tempfile.mkdtemp(prefix="lf-bench-guard-"))
    try:
        steps_per_second("none", loader, work / "warmup")  # imports, allocator, first fit
        for round_index in range(ROUNDS):
            order = CONFIGS[round_index % 3 :] + CONFIGS[: round_index % 3]
            for config in order:
                run_dir = work / f"{config}-{round_index}"
                wall, cpu = steps_per_second(config, loader, run_dir)
                rates[config].append(wall)
                cpu_rates[config].append(cpu)
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratios = [o / m for o, m in zip(rates["ours"], rates["modelcheckpoint"], strict=True)]
    ceiling = [o / n for o, n in zip(rates["ours"], rates["none"], strict=True)]
    print(f"{STEPS} steps per run, save every {SAVE_EVERY} steps, {ROUNDS} interleaved rounds")
    print(f"no checkpointing:          {statistics.median(rates['none']):8.1f} steps/s (median)")
    print(f"anchor ModelCheckpoint:    {statistics.median(rates['modelcheckpoint']):8.1f} steps/s")
    print(f"ours RollbackCheckpoint:   {statistics.median(rates['ours']):8.1f} steps/s")
    ratio = statistics.median(ratios)
    print(
        f"ratio ours / ModelCheckpoint: {ratio:.3f}x (median of {ROUNDS} pairs; per round "
        f"{', '.join(f'{r:.3f}' for r in ratios)}) target >= {TARGET}x "
        f"{'OK' if ratio >= TARGET else 'MISS'}"
    )
    print(f"ratio ours / no checkpointing: {statistics.median(ceiling):.3f}x")
    # On a shared machine wall time swings with the neighbours' load; CPU seconds per step of
    # this process (all threads) are the steadier view of the same cost.
    cpu_ratios = [
        o / m for o, m in zip(cpu_rates["ours"], cpu_rates["modelcheckpoint"], strict=True)
    ]
    print(
        f"per CPU second: ours {statistics.median(cpu_rates['ours']):.1f}, ModelCheckpoint "
        f"{statistics.median(cpu_rates['modelcheckpoint']):.1f}, none "
        f"{statistics.median(cpu_rates['none']):.1f} steps; ratio ours / ModelCheckpoint "
        f"{statistics.median(cpu_ratios):.3f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
