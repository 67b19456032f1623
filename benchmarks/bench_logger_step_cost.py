"""PrometheusLogger cost per training step as a fraction of one reference-task training step.

Reference step: one PPO update of ``lightning_fragrance.rl.PPO`` on the fragrance formulation
env (falls back to the toy policy module when the PPO task is not importable; the output says
which), timed inside a real ``Trainer.fit`` without a logger.

Logger cost per step: ``log_metrics`` with the 10 keys a PPO step logs (+ Lightning's
``save()`` call after it), pushes throttled to the default ``push_interval`` (15 s). Pushes run
on a background thread, but they still take CPU, so their measured cost is amortised over the
steps between two pushes and added. Anchors in the same run: Lightning's own ``CSVLogger`` doing
the same per-step work, and the floor of 10 raw prometheus_client gauge sets.
Target (issue 4): < 0.5% of a training step.

Run: ``python benchmarks/bench_logger_step_cost.py`` (about 1 minute).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
import timeit
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from prometheus_client import CollectorRegistry, Gauge

from lightning_fragrance.loggers import PrometheusLogger
from lightning_fragrance.monitoring.servers import start_pushgateway

STEP_METRICS = {
    "train/loss": 0.31,
    "train/policy_loss": -0.02,
    "train/value_loss": 0.66,
    "train/entropy": 1.21,
    "train/clip_fraction": 0.11,
    "train/kl": 0.004,
    "train/grad_norm": 0.48,
    "train/episodes": 8.0,
    "train/reward": 12.5,
    "epoch": 0,
}
CALLS = 5_000


class StepTimer(pl.Callback):
    """Wall time of each training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.durations.append(time.perf_counter() - self._start)


def reference_step_seconds() -> tuple[str, float]:
    """Median wall time of one training step of the reference task (first step dropped)."""
    try:
        from lightning_fragrance.fragrance import ENV_ID
        from lightning_fragrance.rl import PPO

        model: pl.LightningModule = PPO(env_id=f"lightning_fragrance.fragrance:{ENV_ID}")
        name = f"PPO update on {ENV_ID} (rl.PPO defaults: 8 envs x 128 steps, 4 epochs)"
        loader = None
        steps = 4  # a default-config update takes seconds on a 2-core machine
    except ImportError:
        from lightning_fragrance.examples.toy import ToyPolicyModule, toy_dataloader

        model = ToyPolicyModule()
        name = "ToyPolicyModule step (rl.PPO not available)"
        loader = toy_dataloader(n=4096)
        steps = 60
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, loader)
    return name, statistics.median(timer.durations[1:])


def per_call(fn: Any) -> float:
    return min(timeit.repeat(fn, number=CALLS, repeat=5)) / CALLS


def main() -> int:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    task, step_s = reference_step_seconds()

    workdir = Path(tempfile.mkdtemp(prefix="bench_logger_"))
    gateway = None
    try:
        if shutil.which("prometheus-pushgateway"):
            gateway = start_pushgateway(workdir / "pushgateway")
        logger = PrometheusLogger(
            pushgateway_url=gateway.address if gateway else None, push_interval=15.0
        )
        counter = iter(range(10**9))

        def ours() -> None:
            logger.log_metrics(STEP_METRICS, step=next(counter))
            logger.save()

        ours_s = per_call(ours)
        push_s = 0.0
        if gateway is not None:
            push_s = min(timeit.repeat(logger._push, number=20, repeat=3)) / 20
        # At most one push per push_interval, and at most one per log call (one per step here).
        pushes_per_step = min(1.0, step_s / logger.push_interval)
        ours_total_s = ours_s + push_s * pushes_per_step
        logger.finalize("success")

        csv = CSVLogger(str(workdir / "csv"), name="bench")
        csv_counter = iter(range(10**9))

        def anchor() -> None:
            csv.log_metrics(dict(STEP_METRICS), step=next(csv_counter))
            csv.save()

        csv_s = per_call(anchor)
        csv.finalize("success")

        registry = CollectorRegistry()
        gauges = [Gauge(f"g{i}", "raw", registry=registry) for i in range(len(STEP_METRICS))]
        values = list(STEP_METRICS.values())

        def raw() -> None:
            for gauge, value in zip(gauges, values, strict=True):
                gauge.set(value)

        raw_s = per_call(raw)
    finally:
        if gateway is not None:
            gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    fraction = ours_total_s / step_s
    print(f"reference step: {task}: {step_s * 1e3:.1f} ms (median)")
    print(f"ours   PrometheusLogger log_metrics+save, 10 keys: {ours_s * 1e6:8.1f} us/step")
    if gateway is not None:
        print(
            f"       push to a real Pushgateway: {push_s * 1e3:.2f} ms each (background thread), "
            f"{pushes_per_step:.3g} per step = {push_s * pushes_per_step * 1e6:.2f} us/step"
        )
    else:
        print("       (prometheus-pushgateway not installed: push cost not included)")
    print(f"       total: {ours_total_s * 1e6:8.1f} us/step")
    print(f"anchor Lightning CSVLogger, same 10 keys:         {csv_s * 1e6:8.1f} us/step")
    print(f"floor  10 raw prometheus_client Gauge.set calls:  {raw_s * 1e6:8.1f} us/step")
    print(
        f"ratio log_metrics+save ours/CSVLogger: {ours_s / csv_s:.2f}x; ours/raw floor: "
        f"{ours_s / raw_s:.1f}x; with pushes ours/CSVLogger: {ours_total_s / csv_s:.1f}x"
    )
    print(f"fraction of one training step: {fraction:.4%} (target < 0.5%)")
    print("PASS" if fraction < 0.005 else "MISS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
