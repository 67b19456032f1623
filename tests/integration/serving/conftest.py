"""Fixtures for the serving integration tests: real checkpoints and real uvicorn servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from serving_server import ServerProcess, start_server

from lightning_fragrance.rl import PPO

ENV_ID = "lightning_fragrance.fragrance:FragranceFormulation-v0"


@pytest.fixture(scope="session")
def ppo_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two Lightning checkpoints (after update 1 and 2) of a tiny PPO from a real Trainer.fit."""
    directory = tmp_path_factory.mktemp("ckpts")
    model = PPO(
        env_id=ENV_ID,
        num_envs=2,
        rollout_steps=8,
        minibatch_size=16,
        update_epochs=1,
        hidden_sizes=[16, 16],
    )
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[
            ModelCheckpoint(
                dirpath=directory,
                filename="step{step}",
                every_n_train_steps=1,
                save_top_k=-1,
                auto_insert_metric_name=False,
            )
        ],
    )
    trainer.fit(model)
    return sorted(directory.glob("*.ckpt"))


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def factory(export_dir: Path, **overrides: object) -> ServerProcess:
        server = start_server(export_dir, tmp_path, **overrides)
        started.append(server)
        server.wait_ready()
        return server

    yield factory
    for server in started:
        server.stop()
