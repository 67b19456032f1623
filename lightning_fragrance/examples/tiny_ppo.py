"""Real Lightning checkpoints of a tiny PPO on the fragrance task, in seconds.

The serving tests and benchmarks export and load these: one short real `Trainer.fit` writes a
standard Lightning checkpoint after each update, so the export path is exercised on the files
users really have.
"""

from __future__ import annotations

from pathlib import Path

FRAGRANCE_ENV_ID = "lightning_fragrance.fragrance:FragranceFormulation-v0"


def tiny_ppo_checkpoints(directory: Path, steps: int = 2, hidden: int = 16) -> list[Path]:
    """Fit PPO for `steps` updates (hidden layers of width `hidden`) and return the checkpoint
    written after each update, oldest first."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_fragrance.rl import PPO

    model = PPO(
        env_id=FRAGRANCE_ENV_ID,
        num_envs=2,
        rollout_steps=8,
        minibatch_size=16,
        update_epochs=1,
        hidden_sizes=[hidden, hidden],
    )
    trainer = pl.Trainer(
        max_steps=steps,
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
    return sorted(Path(directory).glob("*.ckpt"))
