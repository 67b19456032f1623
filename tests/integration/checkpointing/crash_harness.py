"""Shared pieces of the crash-safety and disk-full tests: a model with a sizeable checkpoint, an
independent checker of a checkpoint directory, and a fork-based child runner.

Children are forked from the pytest process, which has already imported torch and Lightning, so a
fresh child per iteration costs a fork instead of a ~3 s interpreter start (issue 2 asks for at
least 20 kills within the test budget).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HISTORY = "checkpoint_history.json"


class PayloadModule(pl.LightningModule):
    """An MLP whose checkpoint is a few tens of MB (weights + two Adam moments), so a save takes
    long enough for a random kill to land inside the write, rename or history update.
    ``kl_spike_at`` makes KL jump to 1.0 in the training step run at that ``global_step``.

    Loss, reward and KL are logged under the callback's default keys with tame values; callers
    switch the loss/reward triggers off, so these runs never roll back on their own.
    """

    def __init__(self, width: int = 1024, kl_spike_at: int | None = None) -> None:
        super().__init__()
        self.kl_spike_at = kl_spike_at
        self.net = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width))
        self.head = nn.Linear(width, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.net(x)), y)
        spike = self.kl_spike_at is not None and self.trainer.global_step == self.kl_spike_at
        kl = torch.tensor(1.0 if spike else 0.001)
        reward = torch.tensor(1.0)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        self.log("train/reward", reward, on_step=True, on_epoch=False)
        self.log("train/kl", kl, on_step=True, on_epoch=False)
        return {"loss": loss, "train/kl": kl, "train/reward": reward}

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def payload_loader(n: int = 256, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=batch_size)


def quiet_trainer(callbacks: list[pl.Callback], max_steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class DirectoryState:
    """What an independent reader (not the engine) finds in a checkpoint directory."""

    history_exists: bool
    entries: list[dict[str, Any]] = field(default_factory=list)
    good_steps: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    tmp_files: list[str] = field(default_factory=list)

    @property
    def newest_good_step(self) -> int | None:
        return max(self.good_steps) if self.good_steps else None


def inspect_directory(directory: Path) -> DirectoryState:
    """Parse the history with the plain `json` module (no repair) and check every entry that is
    not marked corrupt: its file exists, has the recorded size and the recorded sha256."""
    history_path = directory / HISTORY
    tmp_files = sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))
    if not history_path.exists():
        return DirectoryState(history_exists=False, tmp_files=tmp_files)
    state = DirectoryState(history_exists=True, tmp_files=tmp_files)
    try:
        history = json.loads(history_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        state.problems.append(f"{HISTORY} does not parse: {error}")
        return state
    state.entries = list(history.get("entries", []))
    for entry in state.entries:
        if entry.get("status") == "corrupt":
            continue
        file = directory / Path(entry["file"]).name
        if not file.exists():
            state.problems.append(f"entry step={entry['step']} names missing file {file.name}")
            continue
        if file.stat().st_size != entry["bytes"]:
            state.problems.append(
                f"{file.name}: {file.stat().st_size} bytes on disk, history says {entry['bytes']}"
            )
            continue
        if sha256_of(file) != entry["sha256"]:
            state.problems.append(f"{file.name}: sha256 differs from the history")
            continue
        state.good_steps.append(int(entry["step"]))
    return state


@dataclass
class ForkedChild:
    """A forked child process with a pipe it writes progress lines into."""

    pid: int
    read_fd: int

    def read_line(self, timeout_s: float) -> str | None:
        """The next line the child wrote, or None if it wrote nothing within the timeout or
        exited (a bounded wait, so a stuck child cannot hang the test)."""
        data = b""
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([self.read_fd], [], [], timeout_s)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 1)
            if not chunk:
                return None
            data += chunk
        return data.decode().strip()

    def exited_within(self, timeout_s: float) -> bool:
        """Whether the child exited (its end of the pipe closed) within the timeout; lines it
        wrote meanwhile are discarded."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready and not os.read(self.read_fd, 4096):
                return True
        return False

    def kill_and_reap(self, sig: int) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        return self.wait()

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.read_fd)
        return status


def fork_child(body: Callable[[Callable[[str], None]], int], log_path: Path) -> ForkedChild:
    """Fork a child that runs `body(report)` and exits with its return code.

    The child writes stdout/stderr to `log_path`, uses one intra-op thread (an OpenMP pool is not
    usable across fork) and never returns into pytest: it ends with `os._exit`.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            os.close(read_fd)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            # pytest's capture objects would keep the child's messages in the child's memory.
            sys.stdout = sys.stderr = os.fdopen(log_fd, "w", buffering=1)
            torch.set_num_threads(1)

            def report(line: str) -> None:
                os.write(write_fd, line.encode() + b"\n")

            code = body(report)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    return ForkedChild(pid=pid, read_fd=read_fd)


class ReportFirstBatch(pl.Callback):
    """Writes `started <global_step>` through the child's pipe at the first batch of a fit."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self.done = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.done:
            self.done = True
            self.report(f"started {trainer.global_step}")
