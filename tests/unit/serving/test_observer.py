"""CollectorReloadObserver: a real HotReloadManager's events land in the catalogued metrics."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from lightning_fragrance import monitoring, serving
from lightning_fragrance.monitoring import MetricGroup, OperationsMetricsCollector
from lightning_fragrance.serving.hot_reload import DrainTimeoutExceeded, HotReloadManager
from lightning_fragrance.serving.observer import CollectorReloadObserver


class Tiny(nn.Module):
    """A one-layer net that remembers the version it was loaded as."""

    def __init__(self, version: str) -> None:
        super().__init__()
        self.version = version
        self.layer = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def load(version: str | None) -> Tiny:
    return Tiny(version or "v0")


def warmup(model: Tiny) -> torch.Tensor:
    return model(torch.ones(1, 2))


def make(**kwargs: object) -> tuple[HotReloadManager[Tiny], CollectorRegistry]:
    registry = CollectorRegistry()
    collector = OperationsMetricsCollector(registry, groups=frozenset({MetricGroup.RELOAD}))
    manager: HotReloadManager[Tiny] = HotReloadManager(
        load,
        warmup_func=warmup,
        warmup_steps=1,
        observer=CollectorReloadObserver(collector),
        **{"drain_timeout": 1.0, **kwargs},  # type: ignore[arg-type]
    )
    manager.initialize_first_worker("v1")
    return manager, registry


def reloads(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value("model_reload_total", {"result": result})
    assert value is not None, f"model_reload_total{{result={result!r}}} is not exported"
    return value


def test_the_manager_and_the_metric_share_one_result_vocabulary() -> None:
    assert serving.ReloadResult is monitoring.ReloadResult


def test_an_admin_rollback_is_counted_as_rolled_back_not_as_success() -> None:
    manager, registry = make(keep_previous_s=30.0)
    assert manager.reload("v2")
    assert manager.rollback(reason="manual")
    assert reloads(registry, "success") == 1.0
    assert reloads(registry, "rolled_back") == 1.0


def test_a_rollback_that_reloads_the_previous_version_is_counted_as_rolled_back() -> None:
    manager, registry = make()  # no standby kept: the rollback loads v1 again
    assert manager.reload("v2")
    assert manager.rollback()
    assert reloads(registry, "success") == 1.0
    assert reloads(registry, "rolled_back") == 1.0


def test_the_automatic_revert_on_errors_is_counted_as_rolled_back() -> None:
    manager, registry = make(keep_previous_s=30.0, revert_error_rate=0.5, revert_min_requests=2)
    assert manager.reload("v2")

    def broken(model: Tiny) -> str:
        raise ValueError("decoder blew up")

    for _ in range(2):
        with pytest.raises(ValueError):
            manager.serve(broken)
    deadline = time.monotonic() + 10
    while reloads(registry, "rolled_back") == 0.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reloads(registry, "rolled_back") == 1.0
    assert reloads(registry, "success") == 1.0
    assert manager.current_version == "v1"


def test_the_manager_and_the_metric_share_one_phase_vocabulary() -> None:
    assert serving.ReloadPhase is monitoring.ReloadPhase


def test_every_phase_of_a_reload_is_timed_including_the_old_workers_stop() -> None:
    manager, registry = make()  # no standby kept: the old worker stops inside the reload
    before = {
        phase: registry.get_sample_value("model_reload_phase_seconds_count", {"phase": phase})
        for phase in ("loading", "validating", "warming", "switching", "draining", "stopped")
    }
    assert manager.reload("v2")
    for phase, count in before.items():
        after = registry.get_sample_value("model_reload_phase_seconds_count", {"phase": phase})
        assert after == (count or 0.0) + 1.0, phase


@pytest.mark.parametrize("action", ["leave_running", "reject"])
def test_a_request_past_the_drain_timeout_is_counted_by_action(action: str) -> None:
    manager, registry = make(drain_timeout=0.05, drain_timeout_action=action)
    entered, release = threading.Event(), threading.Event()

    def slow(model: Tiny) -> str:
        entered.set()
        release.wait(10)
        return model.version

    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(manager.serve(slow))
        except DrainTimeoutExceeded as exc:  # the reject action withholds the answer
            outcome.append(exc)

    request = threading.Thread(target=run, daemon=True)
    request.start()
    assert entered.wait(10)
    try:
        assert manager.reload("v2")  # returns after the drain timed out with 1 request running
    finally:
        release.set()
        request.join(10)
    if action == "reject":
        assert len(outcome) == 1 and isinstance(outcome[0], DrainTimeoutExceeded)
    else:
        assert outcome == ["v1"]
    labels = {"action": action}
    counted = registry.get_sample_value("model_reload_drain_timeout_requests_total", labels)
    assert counted == 1.0


def test_each_model_line_records_its_versions_and_reloads_under_its_own_model_label() -> None:
    registry = CollectorRegistry()
    collector = OperationsMetricsCollector(registry, groups=frozenset({MetricGroup.RELOAD}))
    policy: HotReloadManager[Tiny] = HotReloadManager(
        load, warmup_steps=0, observer=CollectorReloadObserver(collector)
    )
    brief: HotReloadManager[Tiny] = HotReloadManager(
        load, warmup_steps=0, observer=CollectorReloadObserver(collector, model="brief_llm")
    )
    policy.initialize_first_worker("v1")
    brief.initialize_first_worker("v1")  # the same version name in the other line
    assert brief.reload("v2")

    def line(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    info = "model_line_info"
    assert line(info, model="policy", role="current", version="v1") == 1
    assert line(info, model="brief_llm", role="current", version="v2") == 1
    assert line(info, model="brief_llm", role="current", version="v1") == 0
    assert line("model_line_reload_total", model="brief_llm", result="success") == 1
    assert line("model_line_reload_total", model="policy", result="success") == 0
    phase = "model_line_reload_phase_seconds_count"
    assert line(phase, model="brief_llm", phase="switching") == 1  # the first load has none
    # The unlabelled model_* metrics stay the policy line's: the brief reload is not in them.
    assert line("model_reload_total", result="success") == 0
    assert line("model_info", role="current", version="v1") == 1


def test_the_brief_lines_drain_timeout_and_abandoned_load_count_under_its_model_label() -> None:
    registry = CollectorRegistry()
    collector = OperationsMetricsCollector(registry, groups=frozenset({MetricGroup.RELOAD}))
    entered, release = threading.Event(), threading.Event()

    def loader(version: str | None) -> Tiny:
        if version == "stuck":
            release.wait(10)  # a load that outlives load_timeout (a hung mount, say)
        return Tiny(version or "v0")

    observer = CollectorReloadObserver(collector, model="brief_llm")
    brief: HotReloadManager[Tiny] = HotReloadManager(
        loader,
        warmup_steps=0,
        drain_timeout=0.05,
        drain_timeout_action="reject",
        observer=observer,
        load_timeout=0.5,
    )
    brief.initialize_first_worker("v1")

    def slow(model: Tiny) -> str:
        entered.set()
        release.wait(10)
        return model.version

    request = threading.Thread(target=lambda: _served(brief, slow), daemon=True)
    request.start()
    assert entered.wait(10)
    try:
        assert brief.reload("v2")  # the drain times out with the request still running
        assert not brief.reload("stuck")  # abandoned past load_timeout
    finally:
        release.set()
        request.join(10)

    def line(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    drain = "model_line_drain_timeout_requests_total"
    assert line(drain, model="brief_llm", action="reject") == 1
    assert line(drain, model="policy", action="reject") == 0
    assert line("model_line_reload_abandoned_loads_total", model="brief_llm") == 1
    assert (observer.drain_timeouts, observer.abandoned_loads) == ({"reject": 1}, 1)
    # Not in the policy's unlabelled counters.
    assert line("model_reload_drain_timeout_requests_total", action="reject") == 0
    assert line("model_reload_abandoned_loads_total") == 0


def _served(manager: HotReloadManager[Tiny], fn: object) -> None:
    with contextlib.suppress(DrainTimeoutExceeded):
        manager.serve(fn)  # type: ignore[arg-type]
