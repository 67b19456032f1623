"""Recovery from an injected divergence: the same seed and fault with the guard, without it, and
a clean run; plus false rollbacks of a healthy run with the default guard (rollback_ppo.yaml).

Runs (fragrance task, default model config, same seed):
  clean    : no fault, guard on   -> the reference reward, and the false-rollback count
  guarded  : lr x100 at FAULT_STEP, guard on
  unguarded: lr x100 at FAULT_STEP, no guard
Final reward = mean logged reward of the last 10 updates. Targets: guarded >= 0.95x clean,
unguarded visibly lower, 0 false rollbacks. Prints ours (guarded), the anchor (unguarded and
clean), the ratios and the targets.
"""

from __future__ import annotations

import sys
import tempfile
import time

from hydra import compose, initialize_config_dir

from lightning_fragrance.cli.train import TrainingResult, find_config_dir, run_training

UPDATES = 100
FAULT_STEP = 50
SAVE_EVERY = 10
SEED = 0


def run(name: str, overrides: list[str]) -> TrainingResult:
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as tmp,
        initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"),
    ):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp}",
                f"seed={SEED}",
                f"trainer.max_steps={UPDATES}",
                "trainer.enable_progress_bar=false",
                "logger=none",
                "report.enabled=false",
                *overrides,
            ],
        )
        result = run_training(cfg)
    rollbacks = len(result.rollback_events)
    print(
        f"  {name:9s}: final reward {result.final_reward():6.2f}, rollbacks {rollbacks}, "
        f"{time.perf_counter() - started:5.1f} s",
        flush=True,
    )
    return result


def main() -> int:
    fault = [
        "experiment=fault_lr_spike",
        f"callbacks.fault.at_step={FAULT_STEP}",
        f"trainer.max_steps={UPDATES}",
    ]
    guard = [f"callbacks.rollback.save_every_n_steps={SAVE_EVERY}"]
    print(f"fragrance PPO, {UPDATES} updates, lr x100 at update {FAULT_STEP}, seed {SEED}")
    clean = run("clean", guard)
    guarded = run("guarded", fault + guard)
    unguarded = run("unguarded", [*fault, "callbacks=none", "trainer.enable_checkpointing=false"])
    c, g, u = clean.final_reward(), guarded.final_reward(), unguarded.final_reward()
    false_rollbacks = len(clean.rollback_events)
    print("\nrecovery from an lr spike (final mean reward of the last 10 updates)")
    print(f"  ours   : guarded {g:.2f} ({len(guarded.rollback_events)} rollback(s))")
    print(f"  anchor : unguarded {u:.2f}; clean {c:.2f}")
    print(f"  ratio  : guarded / clean = {g / c:.3f}x; unguarded / clean = {u / c:.3f}x")
    print("  target : guarded >= 0.95x clean, unguarded visibly lower")
    print(
        f"  healthy run with the default guard (rollback_ppo.yaml): {false_rollbacks} false "
        "rollback(s); target 0"
    )
    ok = g >= 0.95 * c and u < g and false_rollbacks == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
