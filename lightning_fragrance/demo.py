"""`make demo` (`python -m lightning_fragrance.demo`): the main job, end to end.

1. train the reference task (PPO on fragrance formulation) with the rollback guard and an
   injected fault, so a rollback happens and the recovery shows; training metrics go through
   `PrometheusLogger` (pushed to the Pushgateway of `make monitoring` when it runs);
2. write the PNG report;
3. export an older checkpoint, serve it with `lf-serve`, ask for a formula, export the newest
   checkpoint, hot-reload it without a restart and ask again (both answers with their versions);
   the brief stage is the brief LLM line (`brief_backend=llm`), first the SFT model shipped in
   the package; a short GRPO run (`lf-train task=brief_llm`, in the background from the start,
   beside the PPO training) fine-tunes it under the guard, `lf-export` exports its newest
   checkpoint, and the running server hot-reloads it (`{"model": "brief_llm"}`): both
   `X-Brief-Model-Version`s;
4. print a short metrics summary and where the checkpoints, history JSON and report are.

    python -m lightning_fragrance.demo                          # lr spike at update 120
    python -m lightning_fragrance.demo --fault nan_grad
    python -m lightning_fragrance.demo --output-dir /tmp/demo trainer.max_steps=300
    python -m lightning_fragrance.demo --brief-updates 0        # briefs by the rule parser
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
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


def brief_fine_tune_command(
    output_dir: Path, sft_dir: Path, updates: int = BRIEF_UPDATES, overrides: Sequence[str] = ()
) -> list[str]:
    """`lf-train task=brief_llm model.sft_dir=<sft_dir> trainer.max_steps=<updates>`: GRPO from
    the given SFT model under `RollbackCheckpoint` with the operations guide's thresholds
    (`configs/callbacks/rollback_brief_llm.yaml`: KL 0.03, loss x2.0, reward drop 0.3), a
    checkpoint every `updates` updates so that the last update is saved."""
    return [
        sys.executable,
        "-m",
        "lightning_fragrance.cli.train",
        "task=brief_llm",
        f"model.sft_dir={sft_dir}",
        f"trainer.max_steps={updates}",
        f"callbacks.rollback.save_every_n_steps={updates}",
        f"hydra.run.dir={output_dir}",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "report.enabled=false",
        *overrides,
    ]


@dataclass
class BriefFineTune:
    """The brief model's GRPO fine-tune, a real `lf-train` process in the background.

    It starts with the demo, so that on 2 cores it runs beside the PPO training (one torch
    thread each) instead of after it; the serving stage waits for it only when it needs the
    newer brief model.

    Attributes:
        process: The `lf-train` process (stopped by its own PID, `stop`).
        output_dir: Its run directory (`checkpoints/`, `metrics.json`, `rl/`).
        log_path: Its output.
        started: `time.perf_counter()` at the start.
    """

    process: subprocess.Popen[bytes]
    output_dir: Path
    log_path: Path
    started: float

    @classmethod
    def start(
        cls,
        output_dir: Path,
        sft_dir: Path,
        updates: int = BRIEF_UPDATES,
        overrides: Sequence[str] = (),
    ) -> BriefFineTune:
        """Start `brief_fine_tune_command` with its output in `output_dir/lf-train.log`."""
        output_dir.mkdir(parents=True, exist_ok=True)
        command = brief_fine_tune_command(output_dir, sft_dir, updates, overrides)
        log_path = output_dir / "lf-train.log"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        print(
            f"[demo] brief LLM: lf-train task=brief_llm model.sft_dir={sft_dir} "
            f"trainer.max_steps={updates} started in the background (log: {log_path})"
        )
        return cls(process, output_dir, log_path, time.perf_counter())

    def wait(self) -> Path:
        """Wait for the run; its newest checkpoint the guard kept usable.

        Raises:
            RuntimeError: The run failed, or kept no usable checkpoint (the log's tail says why).
        """
        from lightning_fragrance.checkpointing.store import CheckpointStore

        if self.process.poll() is None:
            print("[demo] waiting for the brief LLM fine-tune ...", flush=True)
        returncode = self.process.wait()
        seconds = time.perf_counter() - self.started
        tail = self.log_path.read_text(errors="replace")[-3000:]
        if returncode != 0:
            raise RuntimeError(f"the brief fine-tune exited with {returncode}:\n{tail}")
        store = CheckpointStore(str(self.output_dir / "checkpoints"), read_only=True)
        usable = [r for r in store.records() if r.status not in ("corrupt", "rejected")]
        if not usable:
            raise RuntimeError(f"the brief fine-tune kept no usable checkpoint:\n{tail}")
        rollbacks = [e for e in store.events() if e.get("type") == "rollback"]
        metrics = json.loads((self.output_dir / "metrics.json").read_text())
        rewards = [m["train/reward"] for m in metrics if "train/reward" in m]
        kls = [m["train/kl"] for m in metrics if "train/kl" in m]
        print(
            f"[demo] brief LLM: {len(rewards)} GRPO updates under the guard (the guide's "
            f"thresholds, configs/callbacks/rollback_brief_llm.yaml) in {seconds:.1f} s wall, "
            f"{len(rollbacks)} rollback(s), train/reward {rewards[0]:.3f} -> {rewards[-1]:.3f}, "
            f"train/kl max {max(kls):.1e}"
        )
        return Path(store.url(usable[-1].file))

    def stop(self) -> None:
        """End the run if it is still going (the demo was interrupted or failed)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def serve(result: TrainingResult, brief: BriefFineTune | None = None) -> DemoResult | None:
    """Stage 4: serve an older checkpoint, hot-reload the newest, print both answers; with
    `brief`, the brief LLM line too: the shipped SFT model first, then `brief`'s newest
    checkpoint, hot-reloaded.

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
    line = None
    if brief is not None:
        from lightning_fragrance.llm.shipped import shipped_sft_dir

        line = BriefLineDemo(first_export=shipped_sft_dir(), fine_tune=brief.wait)
    return run_serving_demo(old, new, result.output_dir / "serving", brief_llm=line)


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
    brief = None
    if args.brief_updates > 0:
        from lightning_fragrance.llm.shipped import shipped_sft_dir

        brief_dir = output_dir.resolve() / "brief_llm"
        brief = BriefFineTune.start(brief_dir, shipped_sft_dir(), args.brief_updates)
    try:
        result = train(cfg)
        report(result, cfg)
        serve(result, brief)
        metrics_summary(result)
        summarize(result)
    finally:
        if brief is not None:
            brief.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
