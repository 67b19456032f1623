"""The fragrance task with the default config (configs/train.yaml, no fault): time and updates
until the mean reward reaches 20, the final reward, and a greedy evaluation on 500 fresh briefs,
next to the random and heuristic baselines measured in the same run.

Target (the issue): mean reward >= 20 within 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import sys
import tempfile
import time

import lightning.pytorch as pl
import numpy as np
from hydra import compose, initialize_config_dir

from lightning_fragrance.cli.train import build_components, find_config_dir
from lightning_fragrance.fragrance.baselines import baseline_rewards
from lightning_fragrance.rl import PPO, evaluate_policy

TARGET = 20.0
TIME_LIMIT_S = 180.0
SMOOTHING = 5  # updates in the trailing mean that must reach the target


class ReachTarget(pl.Callback):
    """Note when the trailing mean reward first reaches `TARGET`; stop at the time limit."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.rewards: list[float] = []
        self.reached: tuple[int, float] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()  # time the training, not the setup

    def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
        self.rewards.append(float(trainer.callback_metrics["train/reward"]))
        elapsed = time.perf_counter() - self.started
        recent = np.mean(self.rewards[-SMOOTHING:])
        if self.reached is None and len(self.rewards) >= SMOOTHING and recent >= TARGET:
            self.reached = (trainer.global_step, elapsed)
            print(
                f"  reward {recent:.2f} >= {TARGET} at update {trainer.global_step}, "
                f"{elapsed:.1f} s",
                flush=True,
            )
        if elapsed > TIME_LIMIT_S:
            trainer.should_stop = True


def main() -> int:
    with (
        tempfile.TemporaryDirectory() as tmp,
        initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"),
    ):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp}",
                "callbacks=none",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "trainer.enable_checkpointing=false",
            ],
        )
        watch = ReachTarget()
        module, trainer, _, _ = build_components(cfg, extra_callbacks=[watch])
        trainer.fit(module)
    assert isinstance(module, PPO)
    elapsed = time.perf_counter() - watch.started
    final = float(np.mean(watch.rewards[-10:]))
    greedy = evaluate_policy(
        module.policy_net,
        module.config.env_id,
        module.config.env_kwargs,
        episodes=500,
        seed=123_456,
    )
    baselines = baseline_rewards(episodes=500, seed=123_456)
    heuristic = baselines["heuristic"].mean_reward
    print(f"\nfragrance PPO, default config, {trainer.global_step} updates in {elapsed:.1f} s")
    if watch.reached:
        step, seconds = watch.reached
        print(
            f"  ours   : mean reward >= {TARGET:g} at update {step} after {seconds:.1f} s; "
            f"final (last 10 updates, sampled) {final:.2f}; greedy on 500 new briefs "
            f"{greedy.mean():.2f}"
        )
    else:
        print(
            f"  ours   : mean reward did NOT reach {TARGET:g}; final {final:.2f}, "
            f"greedy {greedy.mean():.2f}"
        )
    print(
        f"  anchor : heuristic {heuristic:.2f}, random {baselines['random'].mean_reward:.2f} "
        "(same 500 briefs)"
    )
    print(
        f"  ratio  : greedy / heuristic = {greedy.mean() / heuristic:.3f}x; "
        f"sampled / heuristic = {final / heuristic:.3f}x"
    )
    print(f"  target : mean reward >= {TARGET:g} within {TIME_LIMIT_S:.0f} s on 2 CPU cores")
    return 0 if watch.reached else 1


if __name__ == "__main__":
    sys.exit(main())
