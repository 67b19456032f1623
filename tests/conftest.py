"""Fixtures shared across the test tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_fragrance.examples.tiny_ppo import tiny_ppo_checkpoints


@pytest.fixture(scope="session")
def ppo_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two Lightning checkpoints (after update 1 and 2) of a tiny PPO on the fragrance task,
    written by a short real `Trainer.fit` (the serving tests export and load them)."""
    paths = tiny_ppo_checkpoints(tmp_path_factory.mktemp("ckpts"), steps=2, hidden=16)
    assert len(paths) == 2, paths
    return paths
