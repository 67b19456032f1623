"""Fixtures shared across the test tree."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fragrance.rl import PPO

FRAGRANCE_ENV_ID = "lightning_fragrance.fragrance:FragranceFormulation-v0"


@pytest.fixture(scope="session")
def ppo_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two Lightning checkpoints (after update 1 and 2) of a tiny PPO on the fragrance task,
    written by a short real `Trainer.fit` (the serving tests export and load them)."""
    directory = tmp_path_factory.mktemp("ckpts")
    model = PPO(
        env_id=FRAGRANCE_ENV_ID,
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
    paths = sorted(directory.glob("*.ckpt"))
    assert len(paths) == 2, paths
    return paths
