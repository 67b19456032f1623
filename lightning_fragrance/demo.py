"""`make demo` (`python -m lightning_fragrance.demo`): the main job, end to end.

Trains the reference task (PPO on fragrance formulation) with the rollback guard and an injected
fault, so a rollback happens and the recovery shows; writes the PNG report; prints where the
checkpoints, the history JSON and the report are. Each stage is a function taking and returning
plain objects, so further stages (export and serve, metrics) slot in between in `main`.

    python -m lightning_fragrance.demo                          # lr spike at update 120
    python -m lightning_fragrance.demo --fault nan_grad
    python -m lightning_fragrance.demo --output-dir /tmp/demo trainer.max_steps=300
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from lightning_fragrance.cli.train import (
    TrainingResult,
    find_config_dir,
    run_training,
    summary_lines,
    write_report,
)

FAULTS = ("lr_spike", "reward_flip", "nan_grad", "none")


def configure(
    output_dir: Path, fault: str = "lr_spike", overrides: Sequence[str] = ()
) -> DictConfig:
    """Stage 1: compose `configs/train.yaml` for the demo (guard on, a fault injected).

    Args:
        output_dir: Where the run writes everything.
        fault: One of `FAULTS` ("none" = a healthy guarded run).
        overrides: Extra Hydra overrides, e.g. "trainer.max_steps=300".
    """
    from hydra import compose, initialize_config_dir

    if fault not in FAULTS:
        raise ValueError(f"fault={fault!r}; use one of {FAULTS}")
    chosen = [] if fault == "none" else [f"experiment=fault_{fault}"]
    with initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *chosen,
                f"paths.output_dir={output_dir}",
                "trainer.enable_progress_bar=true",
                # The report is its own stage below.
                "report.enabled=false",
                *overrides,
            ],
        )


def train(cfg: DictConfig) -> TrainingResult:
    """Stage 2: fit with the guard (Lightning's progress bar shows progress)."""
    print(f"[demo] training: {cfg.trainer.max_steps} PPO updates, output in {cfg.paths.output_dir}")
    return run_training(cfg)


def report(result: TrainingResult, cfg: DictConfig) -> Path:
    """Stage 3: the PNG training report (reward, loss, KL, thresholds, rollbacks)."""
    result.report_path = write_report(result, cfg)
    return result.report_path


def summarize(result: TrainingResult) -> None:
    """Last stage: print where everything is and what happened."""
    print("\n[demo] summary")
    for line in summary_lines(result):
        print("  " + line)
    if result.faults and not result.rollback_events:
        print("  note: a fault was injected but no rollback happened; see the report.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo stages in order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=None, help="default outputs/demo/<time>")
    parser.add_argument("--fault", choices=FAULTS, default="lr_spike")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_steps=300")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or Path("outputs/demo") / time.strftime("%Y-%m-%d_%H-%M-%S")
    cfg = configure(output_dir.resolve(), args.fault, args.overrides)
    result = train(cfg)
    report(result, cfg)
    summarize(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
