"""Per-call cost of each OperationsMetricsCollector recorder vs the raw prometheus_client calls.

Anchor: the same metric updates written directly against prometheus_client the way the
operations guide does (``metric.labels(...).inc()`` / ``.observe()`` per call), measured in the
same run on identically defined metrics. A second anchor, raw calls on pre-resolved children,
is the floor no wrapper can beat. Targets (issue 4): ours <= 1.5x the raw calls, and at least
20x under the guide's budget (counter < 0.1 ms, histogram < 0.5 ms). A recorder that updates
several metrics gets the sum of their budgets (gauges count like counters): record_rl_update
sets a counter and eight gauges, so its budget is 0.9 ms.

Run: ``python benchmarks/bench_metrics_overhead.py`` (about 30 s).
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lightning_fragrance.monitoring import OperationsMetricsCollector
from lightning_fragrance.monitoring.metrics import CATALOGUE, MetricType

NUMBER = 20_000
REPEAT = 5
COUNTER_BUDGET_S = 100e-6  # the guide's table
HISTOGRAM_BUDGET_S = 500e-6


def budget(counters: int = 0, histograms: int = 0) -> float:
    """The guide's budget of a recorder making these metric updates."""
    return counters * COUNTER_BUDGET_S + histograms * HISTOGRAM_BUDGET_S


def raw_metrics() -> dict[str, Counter | Gauge | Histogram]:
    """The catalogue's metrics as plain prometheus_client objects in their own registry."""
    registry = CollectorRegistry()
    metrics: dict[str, Counter | Gauge | Histogram] = {}
    for item in CATALOGUE.values():
        if item.dynamic_labels:
            continue
        if item.type is MetricType.COUNTER:
            metrics[item.name] = Counter(item.base_name, item.help, item.labels, registry=registry)
        elif item.type is MetricType.HISTOGRAM:
            buckets = item.buckets or Histogram.DEFAULT_BUCKETS
            metrics[item.name] = Histogram(
                item.name, item.help, item.labels, registry=registry, buckets=buckets
            )
        else:
            metrics[item.name] = Gauge(item.name, item.help, item.labels, registry=registry)
    return metrics


@dataclass
class Case:
    name: str
    ours: Callable[[], None]
    raw: Callable[[], None]
    raw_cached: Callable[[], None]
    budget_s: float


def best_per_call(fn: Callable[[], None]) -> float:
    return min(timeit.repeat(fn, number=NUMBER, repeat=REPEAT)) / NUMBER


def cases() -> list[Case]:
    c = OperationsMetricsCollector(CollectorRegistry())
    r = raw_metrics()
    brief, repairs, latency = (
        r["llm_brief_total"],
        r["llm_brief_repairs_total"],
        r["llm_brief_latency_seconds"],
    )
    api_total, api_latency, inflight = (
        r["api_request_total"],
        r["api_request_latency_seconds"],
        r["inflight_requests"],
    )
    loss = r["rl_loss"]
    rl_gauges = [r[n] for n in ("rl_reward", "rl_entropy", "rl_clip_fraction", "rl_kl_divergence")]
    updates, stamp = r["rl_update_total"], r["rl_last_update_timestamp_seconds"]
    saves, save_seconds = r["checkpoint_saves_total"], r["checkpoint_save_seconds"]
    rollbacks, reloads = r["checkpoint_rollbacks_total"], r["model_reload_total"]

    cached_brief = brief.labels("creative", "success")
    cached_latency = latency.labels("creative")
    cached_repair = repairs.labels("creative", "json_syntax")
    cached_api = api_total.labels("/dna/create", "POST", "200")
    cached_api_latency = api_latency.labels("/dna/create", "POST")
    cached_inflight = inflight.labels("1")
    cached_losses = [loss.labels(t) for t in ("policy", "value", "total")]
    cached_updates = updates.labels("ppo")
    cached_saves = saves.labels("success")
    cached_blocking, cached_write = save_seconds.labels("blocking"), save_seconds.labels("write")
    cached_rollback = rollbacks.labels("kl_spike")
    cached_reload = reloads.labels("success")

    def raw_brief() -> None:
        brief.labels("creative", "success").inc()
        latency.labels("creative").observe(4.2)

    def raw_brief_repaired() -> None:
        raw_brief()
        repairs.labels("creative", "json_syntax").inc()

    def raw_track_brief() -> None:
        start = time.perf_counter()
        brief.labels("creative", "success").inc()
        latency.labels("creative").observe(time.perf_counter() - start)

    def raw_api() -> None:
        api_total.labels("/dna/create", "POST", "200").inc()
        api_latency.labels("/dna/create", "POST").observe(0.05)

    def raw_track_api() -> None:
        gauge = inflight.labels("1")
        gauge.inc()
        start = time.perf_counter()
        gauge.dec()
        api_total.labels("/dna/create", "POST", "200").inc()
        api_latency.labels("/dna/create", "POST").observe(time.perf_counter() - start)

    def raw_rl() -> None:
        updates.labels("ppo").inc()
        loss.labels("policy").set(0.1)
        loss.labels("value").set(0.2)
        loss.labels("total").set(0.3)
        for gauge, value in zip(rl_gauges, (21.0, 1.1, 0.12, 0.01), strict=True):
            gauge.set(value)
        stamp.set(time.time())

    def raw_save() -> None:
        saves.labels("success").inc()
        save_seconds.labels("blocking").observe(0.004)
        save_seconds.labels("write").observe(0.12)

    def cached_rl() -> None:
        cached_updates.inc()
        for child, value in zip(cached_losses, (0.1, 0.2, 0.3), strict=True):
            child.set(value)
        for gauge, value in zip(rl_gauges, (21.0, 1.1, 0.12, 0.01), strict=True):
            gauge.set(value)
        stamp.set(time.time())

    def cached_track_api() -> None:
        cached_inflight.inc()
        start = time.perf_counter()
        cached_inflight.dec()
        cached_api.inc()
        cached_api_latency.observe(time.perf_counter() - start)

    def cached_track_brief() -> None:
        start = time.perf_counter()
        cached_brief.inc()
        cached_latency.observe(time.perf_counter() - start)

    def ours_track_brief() -> None:
        with c.track_llm_brief("creative"):
            pass

    def ours_track_api() -> None:
        with c.track_api_request("/dna/create", "POST") as request:
            request.set_status_code(200)

    def cached_brief_call() -> None:
        cached_brief.inc()
        cached_latency.observe(4.2)

    def cached_brief_repaired() -> None:
        cached_brief_call()
        cached_repair.inc()

    def cached_api_call() -> None:
        cached_api.inc()
        cached_api_latency.observe(0.05)

    def cached_save() -> None:
        cached_saves.inc()
        cached_blocking.observe(0.004)
        cached_write.observe(0.12)

    return [
        Case(
            "record_llm_brief",
            lambda: c.record_llm_brief("creative", True, 4.2),
            raw_brief,
            cached_brief_call,
            budget(counters=1, histograms=1),
        ),
        Case(
            "record_llm_brief (repaired)",
            lambda: c.record_llm_brief("creative", True, 4.2, True, "json_syntax"),
            raw_brief_repaired,
            cached_brief_repaired,
            budget(counters=2, histograms=1),
        ),
        Case(
            "track_llm_brief",
            ours_track_brief,
            raw_track_brief,
            cached_track_brief,
            budget(counters=1, histograms=1),
        ),
        Case(
            "record_api_request",
            lambda: c.record_api_request("/dna/create", "POST", 200, 0.05),
            raw_api,
            cached_api_call,
            budget(counters=1, histograms=1),
        ),
        Case(
            "track_api_request",
            ours_track_api,
            raw_track_api,
            cached_track_api,
            budget(counters=3, histograms=1),  # in-flight gauge inc + dec, counter, histogram
        ),
        Case(
            "record_rl_update",
            lambda: c.record_rl_update("ppo", 0.1, 0.2, 0.3, 21.0, 1.1, 0.12, 0.01),
            raw_rl,
            cached_rl,
            budget(counters=9),  # rl_update_total + 3 losses + 4 gauges + timestamp
        ),
        Case(
            "record_checkpoint_save",
            lambda: c.record_checkpoint_save(0.004, 0.12),
            raw_save,
            cached_save,
            budget(counters=1, histograms=2),
        ),
        Case(
            "record_rollback",
            lambda: c.record_rollback("kl_spike"),
            lambda: rollbacks.labels("kl_spike").inc(),
            cached_rollback.inc,
            budget(counters=1),
        ),
        Case(
            "record_model_reload",
            lambda: c.record_model_reload("success"),
            lambda: reloads.labels("success").inc(),
            cached_reload.inc,
            budget(counters=1),
        ),
    ]


def main() -> int:
    print(f"per call, best of {REPEAT} x {NUMBER:,} calls (prometheus_client, in-memory registry)")
    header = (
        f"{'recorder':28} {'ours':>9} {'raw':>9} {'ratio':>6} {'raw cached':>11} "
        f"{'budget':>8} {'headroom':>9}"
    )
    print(header)
    print("-" * len(header))
    worst_ratio, worst_headroom = 0.0, float("inf")
    for case in cases():
        ours = best_per_call(case.ours)
        raw = best_per_call(case.raw)
        floor = best_per_call(case.raw_cached)
        ratio = ours / raw
        headroom = case.budget_s / ours
        worst_ratio = max(worst_ratio, ratio)
        worst_headroom = min(worst_headroom, headroom)
        print(
            f"{case.name:28} {ours * 1e6:7.2f}us {raw * 1e6:7.2f}us {ratio:5.2f}x "
            f"{floor * 1e6:9.2f}us {case.budget_s * 1e3:6.1f}ms {headroom:8.0f}x"
        )
    print()
    print(f"worst ratio ours/raw: {worst_ratio:.2f}x (target <= 1.5x)")
    print(f"smallest headroom under the guide's budget: {worst_headroom:.0f}x (target >= 20x)")
    ok = worst_ratio <= 1.5 and worst_headroom >= 20
    print("PASS" if ok else "MISS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
