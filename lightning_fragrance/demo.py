"""`make demo` (`python -m lightning_fragrance.demo`): the main job, end to end.

1. train the reference task (PPO on fragrance formulation) with the rollback guard and an
   injected fault, so a rollback happens and the recovery shows; training metrics go through
   `PrometheusLogger` (pushed to the Pushgateway of `make monitoring` when it runs);
2. write the PNG report;
3. export an older checkpoint, serve it with `lf-serve`, ask for a formula, export the newest
   checkpoint, hot-reload it without a restart and ask again (both answers with their versions);
   the brief stage is the brief LLM line (`brief_backend=llm`), first the SFT model shipped in
   the package; then a short GRPO run fine-tunes it under the guard (`lf-train
   task=brief_llm`'s config and thresholds), `lf-export` exports its newest checkpoint, and the
   running server hot-reloads it (`{"model": "brief_llm"}`): both `X-Brief-Model-Version`s;
4. print a short metrics summary and where the checkpoints, history JSON and report are.

    python -m lightning_fragrance.demo                          # lr spike at update 120
    python -m lightning_fragrance.demo --fault nan_grad
    python -m lightning_fragrance.demo --output-dir /tmp/demo trainer.max_steps=300
    python -m lightning_fragrance.demo --brief-updates 0        # briefs by the rule parser
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
from lightning_fragrance.serving.demo_steps import BriefLineDemo, DemoResult

FAULTS = ("lr_spike", "reward_flip", "nan_grad", "none")
# GRPO updates of the demo's brief fine-tune: ~2 s each on 2 busy cores (docs/brief-llm.md).
BRIEF_UPDATES = 10


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


def configure_brief_fine_tune(
    output_dir: Path, sft_dir: Path, updates: int = BRIEF_UPDATES, overrides: Sequence[str] = ()
) -> DictConfig:
    """`lf-train task=brief_llm model.sft_dir=<sft_dir> trainer.max_steps=<updates>`, composed:
    GRPO from the given SFT model under `RollbackCheckpoint` with the operations guide's
    thresholds (`configs/callbacks/rollback_brief_llm.yaml`: KL 0.03, loss x2.0, reward drop
    0.3), a checkpoint every `updates` updates so that the last update is saved."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "task=brief_llm",
                f"model.sft_dir={sft_dir}",
                f"trainer.max_steps={updates}",
                f"callbacks.rollback.save_every_n_steps={updates}",
                f"paths.output_dir={output_dir}",
                "trainer.enable_progress_bar=false",
                "logger=none",
                "report.enabled=false",
                *overrides,
            ],
        )


def fine_tune_brief(cfg: DictConfig) -> Path:
    """Fit the brief model's GRPO (`configure_brief_fine_tune`); its newest usable checkpoint.

    Raises:
        RuntimeError: The guard kept no usable checkpoint (every one rejected or corrupt).
    """
    started = time.perf_counter()
    result = run_training(cfg)
    guard = result.rollback
    usable = [] if guard is None else guard.store.records()
    usable = [r for r in usable if r.status not in ("corrupt", "rejected")]
    if guard is None or not usable:
        raise RuntimeError(f"the brief fine-tune in {cfg.paths.output_dir} kept no checkpoint")
    newest = Path(guard.store.url(usable[-1].file))
    limits = guard.conditions
    print(
        f"[demo] brief LLM: {result.trainer.global_step} GRPO updates from {cfg.model.sft_dir} "
        f"under the guard (KL {limits.kl_threshold}, loss x{limits.loss_increase_multiplier}, "
        f"reward drop {limits.reward_drop_threshold}): {time.perf_counter() - started:.1f} s, "
        f"{len(result.rollback_events)} rollback(s), mean reward {result.final_reward():.3f}, "
        f"train/kl max {_series_max(result, 'train/kl'):.1e}"
    )
    return newest


def _series_max(result: TrainingResult, key: str) -> float:
    _, values = result.history.series(key)
    return float(values.max()) if values.size else float("nan")


def brief_line(output_dir: Path, updates: int = BRIEF_UPDATES) -> BriefLineDemo:
    """The demo's brief LLM line: the shipped SFT model, then `updates` GRPO updates on it."""
    from lightning_fragrance.llm.shipped import shipped_sft_dir

    shipped = shipped_sft_dir()
    return BriefLineDemo(
        first_export=shipped,
        fine_tune=lambda workdir: fine_tune_brief(
            configure_brief_fine_tune(workdir, shipped, updates)
        ),
    )


def serve(result: TrainingResult, brief_updates: int = BRIEF_UPDATES) -> DemoResult | None:
    """Stage 4: serve an older checkpoint, hot-reload the newest, print both answers; with
    `brief_updates` > 0, the brief LLM line too (see `brief_line`).

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
    workdir = result.output_dir / "serving"
    brief = brief_line(workdir, brief_updates) if brief_updates > 0 else None
    return run_serving_demo(old, new, workdir, brief_llm=brief)


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
    parser.add_argument(
        "--brief-updates",
        type=int,
        default=BRIEF_UPDATES,
        help="GRPO updates of the brief LLM fine-tune (0: serve the rule parser's briefs)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_steps=300")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or Path("outputs/demo") / time.strftime("%Y-%m-%d_%H-%M-%S")
    cfg = configure(output_dir.resolve(), args.fault, args.overrides)
    result = train(cfg)
    report(result, cfg)
    serve(result, args.brief_updates)
    metrics_summary(result)
    summarize(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
