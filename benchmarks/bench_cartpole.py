"""PPO on CartPole-v1: updates and seconds until the greedy policy is solved (>= 475 mean over
20 episodes), with configs/model/ppo_cartpole.yaml.

Anchor: a uniformly random policy on the same 20 evaluation episodes. Target: solved within a few
minutes on 2 CPU cores (the issue). Prints ours, the anchor, the ratio and the target.
"""

from __future__ import annotations

import tempfile
import time

import lightning.pytorch as pl
import numpy as np
import torch
from hydra import compose, initialize_config_dir

from lightning_fragrance.cli.train import build_components, find_config_dir
from lightning_fragrance.rl import PPO, evaluate_policy

SOLVED = 475.0
EPISODES = 20
EVAL_EVERY = 5
MAX_UPDATES = 300
TIME_LIMIT_S = 170.0


class SolvedStop(pl.Callback):
    """Evaluate greedily every `EVAL_EVERY` updates; stop once solved or out of time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.curve: list[tuple[int, float, float]] = []
        self.solved_at: tuple[int, float] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()  # time the training, not the setup

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: object
    ) -> None:
        assert isinstance(pl_module, PPO)
        step = trainer.global_step
        elapsed = time.perf_counter() - self.started
        if step % EVAL_EVERY == 0:
            score = float(evaluate_policy(pl_module.policy_net, "CartPole-v1", {}, EPISODES).mean())
            self.curve.append((step, elapsed, score))
            print(
                f"  update {step:4d}  {elapsed:6.1f} s  greedy mean return {score:6.1f}", flush=True
            )
            if score >= SOLVED:
                self.solved_at = (step, elapsed)
                trainer.should_stop = True
        if elapsed > TIME_LIMIT_S:
            trainer.should_stop = True


def random_policy_return(seed: int = 10_000) -> float:
    """Mean return of uniform random actions on the evaluation episodes."""
    import gymnasium as gym

    returns = []
    for episode in range(EPISODES):
        env = gym.make("CartPole-v1")
        env.reset(seed=seed + episode)
        env.action_space.seed(seed + episode)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def main() -> int:
    torch.set_num_threads(1)
    with (
        tempfile.TemporaryDirectory() as tmp,
        initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"),
    ):
        cfg = compose(
            "train",
            overrides=[
                "env=cartpole",
                "model=ppo_cartpole",
                "callbacks=none",
                "logger=none",
                f"paths.output_dir={tmp}",
                f"trainer.max_steps={MAX_UPDATES}",
                "trainer.enable_progress_bar=false",
                "trainer.enable_checkpointing=false",
            ],
        )
        stop = SolvedStop()
        module, trainer, _, _ = build_components(cfg, extra_callbacks=[stop])
        trainer.fit(module)
    anchor = random_policy_return()
    best = max(score for _, _, score in stop.curve)
    print("\nCartPole-v1, PPO (configs/model/ppo_cartpole.yaml), greedy, 20 episodes")
    if stop.solved_at:
        step, seconds = stop.solved_at
        print(
            f"  ours   : solved (>= {SOLVED:.0f}) at update {step} after {seconds:.1f} s "
            f"({step * module.config.num_envs * module.config.rollout_steps} env steps)"
        )
    else:
        print(f"  ours   : NOT solved within {TIME_LIMIT_S:.0f} s; best greedy mean {best:.1f}")
    print(f"  anchor : random policy mean return {anchor:.1f}")
    print(f"  ratio  : best greedy / random = {best / anchor:.1f}x")
    print(f"  target : >= {SOLVED:.0f} mean over {EPISODES} greedy episodes within a few minutes")
    return 0 if stop.solved_at else 1


if __name__ == "__main__":
    raise SystemExit(main())
