"""Two ranks whose checkpoint directory is not the same directory: started by
`test_ddp_shared_directory.py` through `subprocess` (Lightning's and Fabric's launchers re-run
this command for rank 1, so it must not be pytest).

Each rank works in its own folder (`OUT_DIR/node<rank>`) and the guard gets the relative path
`checkpoints`: the same string names a different directory on each rank, exactly as a node-local
path (`/local/ckpt`) does on two machines. Each rank writes `OUT_DIR/rank<r>.json` with the error
it raised (or none).

Usage: `python ddp_unshared_dir_script.py trainer|fabric OUT_DIR`
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.fabric import FabricRollbackGuard


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss.detach())
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run_trainer() -> None:
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    guard = RollbackCheckpoint(dirpath="checkpoints", save_every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(), DataLoader(data, batch_size=4))


def run_fabric() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    FabricRollbackGuard(fabric, "checkpoints", save_every_n_steps=2)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by the launcher for rank 1 only
    node = out / f"node{rank}"
    node.mkdir(parents=True, exist_ok=True)
    sys.argv[0] = str(Path(sys.argv[0]).resolve())  # the launcher re-runs it from rank 0's cwd
    os.chdir(node)
    error = ""
    try:
        run_trainer() if mode == "trainer" else run_fabric()
    except Exception as exc:  # the point of the script: record what each rank raised
        error = f"{type(exc).__name__}: {exc}"
    (out / f"rank{rank}.json").write_text(json.dumps({"error": error}))


if __name__ == "__main__":
    main()
