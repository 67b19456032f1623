"""`make demo` (`python -m lightning_fragrance.demo`): the main job, end to end.

1. train the reference task (PPO on fragrance formulation) with the rollback guard and an
   injected fault, so a rollback happens and the recovery shows; training metrics go through
   `PrometheusLogger` (pushed to the Pushgateway of `make monitoring` when it runs);
2. write the PNG report;
3. export an older checkpoint, serve it with `lf-serve`, ask for a formula, export the newest
   checkpoint, hot-reload it without a restart and ask again (both answers with their versions);
4. print a short metrics summary and where the checkpoints, history JSON and report are.

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
from lightning_fragrance.serving.demo_steps import DemoResult

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
    from lightning_fragrance.monitoring.summary import local_pushgateway

    chosen = [] if fault == "none" else [f"experiment=fault_{fault}"]
    gateway = local_pushgateway()
    # Without a Pushgateway the logger serves /metrics on a free loopback port instead.
    metrics = ["logger=prometheus", f"logger.pushgateway_url={gateway or 'null'}"]
    with initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *chosen,
                f"paths.output_dir={output_dir}",
                "trainer.enable_progress_bar=true",
                # The report is its own stage below.
                "report.enabled=false",
                *metrics,
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


def serve(result: TrainingResult) -> DemoResult | None:
    """Stage 4: serve an older checkpoint, hot-reload the newest, print both answers.

    The two newest checkpoints the guard kept (none rejected by a rollback or corrupt) are the
    "deployed" and the "new" model; the export directory sits beside the checkpoints.
    """
    from lightning_fragrance.serving.demo_steps import run_serving_demo

    if result.rollback is None:
        print("[demo] serving skipped: the run had no checkpoint guard")
        return None
    usable = [r for r in result.rollback.store.records() if r.status not in ("corrupt", "rejected")]
    if len(usable) < 2:
        print(f"[demo] serving skipped: {len(usable)} usable checkpoint(s), two are needed")
        return None
    old, new = (result.rollback.store.url(r.file) for r in usable[-2:])
    return run_serving_demo(old, new, result.output_dir / "serving")


def metrics_summary(result: TrainingResult) -> None:
    """Stage 5: what an operator would read in Grafana, printed (and pushed, if a gateway runs)."""
    from lightning_fragrance.loggers import PrometheusLogger
    from lightning_fragrance.monitoring.summary import format_summary

    logger = result.trainer.logger
    if not isinstance(logger, PrometheusLogger):
        return
    where = (
        f"pushed to {logger.pushgateway_url}"
        if logger.pushgateway_url
        else "no Pushgateway running (`make monitoring` starts one)"
    )
    print(f"\n[demo] {format_summary(logger.registry)}\n  ({where})")


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
    serve(result)
    metrics_summary(result)
    summarize(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
