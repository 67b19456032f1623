"""HotReloadManager: phases, failures, draining, rollback, memory (tiny torch modules)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_fragrance.serving.hot_reload import (
    DrainTimeoutAction,
    DrainTimeoutExceeded,
    HotReloadManager,
    NoModelLoaded,
    NoPreviousVersion,
    ReloadInProgress,
    ReloadPhase,
    ReloadRecord,
    ReloadResult,
    WorkerStatus,
)


class Tiny(nn.Module):
    """A two-layer net whose output reveals its version (the bias of the last layer)."""

    def __init__(self, version: str, fill: float = 0.0) -> None:
        super().__init__()
        self.version = version
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        if fill != 0.0:  # a NaN fill makes an export that loads but must not serve
            with torch.no_grad():
                self.head.weight.fill_(fill)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@dataclass
class Loader:
    """Builds `Tiny` for a version; named versions can fail on purpose."""

    fail: set[str] = field(default_factory=set)
    nan_weights: set[str] = field(default_factory=set)
    calls: list[str | None] = field(default_factory=list)

    def __call__(self, version: str | None) -> Tiny:
        self.calls.append(version)
        name = version or "v0"
        if name in self.fail:
            raise FileNotFoundError(f"no export named {name}")
        return Tiny(name, fill=float("nan") if name in self.nan_weights else 0.0)


@dataclass
class RecordingObserver:
    """A real ReloadObserver that keeps what it was told, for assertions."""

    phases: list[ReloadPhase] = field(default_factory=list)
    results: list[ReloadResult] = field(default_factory=list)
    info: list[tuple[str, str, float]] = field(default_factory=list)
    drain_timeouts: list[tuple[int, DrainTimeoutAction]] = field(default_factory=list)
    abandoned: list[str | None] = field(default_factory=list)

    def on_phase(self, phase: ReloadPhase, seconds: float) -> None:
        self.phases.append(phase)

    def on_reload(self, result: ReloadResult) -> None:
        self.results.append(result)

    def on_model_info(self, role: str, version: str, value: float) -> None:
        self.info.append((role, version, value))

    def on_drain_timeout(self, remaining: int, action: DrainTimeoutAction) -> None:
        self.drain_timeouts.append((remaining, action))

    def on_inflight(self, worker: str, value: int) -> None:
        pass

    def on_load_abandoned(self, version: str | None) -> None:
        self.abandoned.append(version)


def warmup(model: Tiny) -> torch.Tensor:
    return model(torch.ones(1, 4))


def make_manager(loader: Loader | None = None, **kwargs: object) -> HotReloadManager[Tiny]:
    manager: HotReloadManager[Tiny] = HotReloadManager(
        loader or Loader(), warmup_func=warmup, warmup_steps=2, drain_timeout=2.0, **kwargs
    )
    manager.initialize_first_worker("v1")
    return manager


def version_of(model: Tiny) -> str:
    return model.version


def test_serve_runs_the_function_on_the_first_workers_model() -> None:
    manager = make_manager()
    assert manager.serve(version_of) == "v1"
    info = manager.get_current_worker_info()
    assert (info.worker_id, info.status, info.version, info.served) == (
        0,
        WorkerStatus.SERVING,
        "v1",
        1,
    )


def test_serve_before_the_first_worker_raises_no_model_loaded() -> None:
    manager: HotReloadManager[Tiny] = HotReloadManager(Loader())
    with pytest.raises(NoModelLoaded):
        manager.serve(version_of)


def test_reload_walks_every_phase_and_logs_the_guides_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    observer = RecordingObserver()
    manager = make_manager(observer=observer)
    observer.phases.clear()  # the first worker's load reports its phases too
    caplog.set_level(logging.INFO, logger="lightning_fragrance.serving.hot_reload")
    assert manager.reload("v2") is True
    assert manager.serve(version_of) == "v2"
    assert observer.phases == [
        ReloadPhase.LOADING,
        ReloadPhase.VALIDATING,
        ReloadPhase.WARMING,
        ReloadPhase.SWITCHING,
        ReloadPhase.DRAINING,
        ReloadPhase.STOPPED,
    ]
    assert observer.results == [ReloadResult.SUCCESS]
    messages = [r.getMessage() for r in caplog.records]
    expected = [
        "=== Model reload started ===",
        "[worker-1] loading + warm-up",
        "Traffic switched: worker-0 -> worker-1",
        "[worker-0] draining (in-flight: 0)",
        "[worker-0] stopped",
        "=== Model reload finished ===",
    ]
    assert [m for m in messages if m in expected] == expected
    assert ("current", "v2", 1.0) in observer.info and ("current", "v1", 0.0) in observer.info


@pytest.mark.parametrize(
    ("loader", "result", "phase_error"),
    [
        (Loader(fail={"v2"}), ReloadResult.LOAD_FAILED, "FileNotFoundError"),
        (Loader(nan_weights={"v2"}), ReloadResult.VALIDATION_FAILED, "ValidationFailed"),
    ],
)
def test_failed_reload_leaves_the_old_worker_serving_untouched(
    loader: Loader, result: ReloadResult, phase_error: str
) -> None:
    observer = RecordingObserver()
    manager = make_manager(loader, observer=observer)
    assert manager.reload("v2", reload_id="r1") is False
    record = manager.get_reload("r1")
    assert record is not None and record.result is result
    assert record.phase is ReloadPhase.FAILED
    assert record.error is not None and record.error["type"] == phase_error
    assert manager.serve(version_of) == "v1"
    assert manager.get_current_worker_info().worker_id == 0
    assert observer.results == [result]


def test_warmup_that_raises_or_yields_nan_fails_the_reload() -> None:
    calls = {"n": 0}

    def flaky_warmup(model: Tiny) -> torch.Tensor:
        if model.version == "raise":
            raise RuntimeError("shape error in forward")
        if model.version == "nan":
            return torch.tensor([float("nan")])
        calls["n"] += 1
        return model(torch.ones(1, 4))

    manager: HotReloadManager[Tiny] = HotReloadManager(
        Loader(), warmup_func=flaky_warmup, warmup_steps=3, validate_func=None
    )
    manager.initialize_first_worker("v1")
    assert calls["n"] == 3
    assert manager.reload("raise", reload_id="a") is False
    assert manager.reload("nan", reload_id="b") is False
    for rid in ("a", "b"):
        record = manager.get_reload(rid)
        assert record is not None and record.result is ReloadResult.WARMUP_FAILED
    assert manager.serve(version_of) == "v1"


def test_a_second_reload_while_one_runs_raises_reload_in_progress() -> None:
    gate = threading.Event()

    class SlowLoader(Loader):
        def __call__(self, version: str | None) -> Tiny:
            if version == "slow":
                gate.wait(5)
            return super().__call__(version)

    manager = make_manager(SlowLoader())
    record = manager.start_reload("slow")
    with pytest.raises(ReloadInProgress):
        manager.reload("v3")
    with pytest.raises(ReloadInProgress):
        manager.rollback()
    gate.set()
    assert record.done.wait(5)
    assert record.result is ReloadResult.SUCCESS
    assert manager.reload("v3") is True


def test_a_request_keeps_its_worker_across_the_switch_and_the_drain_waits_for_it() -> None:
    manager = make_manager()
    started, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def slow(model: Tiny) -> str:
        started.set()
        release.wait(5)
        return model.version

    thread = threading.Thread(target=lambda: seen.append(manager.serve(slow)))
    thread.start()
    assert started.wait(5)
    reload_record = manager.start_reload("v2")
    # The new worker serves new requests while the old one still holds the slow one.
    deadline = time.monotonic() + 5
    while manager.current_version != "v2" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.serve(version_of) == "v2"
    assert reload_record.phase is ReloadPhase.DRAINING and not reload_record.done.is_set()
    release.set()
    thread.join(5)
    assert reload_record.done.wait(5)
    assert seen == ["v1"]
    assert reload_record.drain_remaining == 0


@pytest.mark.parametrize("action", list(DrainTimeoutAction))
def test_a_request_slower_than_the_drain_timeout_is_handled_as_configured_and_counted(
    action: DrainTimeoutAction, caplog: pytest.LogCaptureFixture
) -> None:
    observer = RecordingObserver()
    manager: HotReloadManager[Tiny] = HotReloadManager(
        Loader(), drain_timeout=0.1, drain_timeout_action=action, observer=observer
    )
    manager.initialize_first_worker("v1")
    caplog.set_level(logging.INFO, logger="lightning_fragrance.serving.hot_reload")
    started, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def slow(model: Tiny) -> str:
        started.set()
        release.wait(5)
        return model.version

    def client() -> None:
        try:
            outcome.append(manager.serve(slow))
        except DrainTimeoutExceeded as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    assert started.wait(5)
    assert manager.reload("v2", reload_id="r") is True
    release.set()
    thread.join(5)
    record = manager.get_reload("r")
    assert record is not None and record.drain_remaining == 1
    assert manager.drain_timeouts_total == 1
    assert observer.drain_timeouts == [(1, action)]
    assert "[worker-0] drain timeout (remaining: 1)" in [r.getMessage() for r in caplog.records]
    if action is DrainTimeoutAction.LEAVE_RUNNING:
        assert outcome == ["v1"]
    else:
        assert isinstance(outcome[0], DrainTimeoutExceeded) and outcome[0].retry_after >= 1


def test_rollback_swaps_back_to_the_warm_previous_worker_without_loading() -> None:
    loader = Loader()
    manager = make_manager(loader, keep_previous_s=30.0)
    assert manager.reload("v2")
    standby = manager.get_standby_info()
    assert standby is not None and standby.status is WorkerStatus.STANDBY
    calls_before = len(loader.calls)
    assert manager.rollback(reload_id="rb") is True
    assert len(loader.calls) == calls_before  # the standby was reused, nothing reloaded
    assert manager.serve(version_of) == "v1"
    assert manager.get_current_worker_info().worker_id == 0
    record = manager.get_reload("rb")
    assert record is not None and record.result is ReloadResult.ROLLED_BACK


def test_rollback_without_a_standby_reloads_the_previous_version() -> None:
    loader = Loader()
    manager = make_manager(loader)
    assert manager.reload("v2")
    assert manager.rollback() is True
    assert loader.calls[-1] == "v1"
    assert manager.serve(version_of) == "v1"


def test_rollback_with_no_earlier_version_raises_and_frees_the_reload_slot() -> None:
    manager = make_manager()
    with pytest.raises(NoPreviousVersion):
        manager.rollback()
    assert manager.reload("v2") is True


def test_the_new_workers_error_rate_reverts_automatically_to_the_kept_worker() -> None:
    observer = RecordingObserver()
    manager = make_manager(
        keep_previous_s=30.0, revert_error_rate=0.5, revert_min_requests=4, observer=observer
    )
    assert manager.reload("v2")

    def broken(model: Tiny) -> str:
        raise ValueError("decoder blew up")

    for _ in range(4):
        with pytest.raises(ValueError):
            manager.serve(broken)
    deadline = time.monotonic() + 5
    while ReloadResult.ROLLED_BACK not in observer.results and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ReloadResult.ROLLED_BACK in observer.results
    assert manager.serve(version_of) == "v1"


def test_the_standby_is_stopped_when_its_rollback_window_ends() -> None:
    manager = make_manager(keep_previous_s=0.05)
    assert manager.reload("v2")
    deadline = time.monotonic() + 5
    while manager.get_standby_info() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.get_standby_info() is None
    assert manager.rollback() is True  # falls back to reloading v1
    assert manager.serve(version_of) == "v1"


def test_the_stopped_workers_model_is_freed() -> None:
    manager = make_manager()
    old_model = manager.serve(lambda model: weakref.ref(model))
    assert manager.reload("v2")
    assert old_model() is None  # freed on STOPPED, without waiting for a GC pass


def test_aserve_runs_sync_functions_in_a_thread_and_awaits_coroutines() -> None:
    manager = make_manager()

    async def async_version(model: Tiny) -> str:
        await asyncio.sleep(0)
        return model.version

    async def main() -> tuple[str, str]:
        return await manager.aserve(version_of), await manager.aserve(async_version)

    assert asyncio.run(main()) == ("v1", "v1")


def test_constructor_rejects_negative_settings_with_the_value() -> None:
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        HotReloadManager(Loader(), warmup_steps=-1)
    with pytest.raises(ValueError, match="drain_timeout"):
        HotReloadManager(Loader(), drain_timeout=-1.0)


def _wait_until(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def test_a_loader_past_its_deadline_fails_the_reload_frees_the_lock_and_is_counted(
    tmp_path: Path,
) -> None:
    never_written = tmp_path / "fifo"
    os.mkfifo(never_written)  # opening it for reading blocks until a writer comes
    base = Loader()

    def loader(version: str | None) -> Tiny:
        if version == "stuck":
            with never_written.open("rb") as fh:
                fh.read()
        return base(version)

    observer = RecordingObserver()
    manager = make_manager(loader, observer=observer, load_timeout=0.5)  # type: ignore[arg-type]
    record = manager.start_reload("stuck")
    assert record.done.wait(30), "the reload did not end at its load deadline"

    assert record.result is ReloadResult.LOAD_FAILED
    assert record.error is not None and record.error["reason"] == "load_timeout"
    assert "load_timeout=0.5 s" in record.error["message"]
    assert not manager.reloading and manager.current_version == "v1"
    assert (manager.abandoned_loads_total, manager.abandoned_loaders_running) == (1, 1)
    assert observer.abandoned == ["stuck"]
    assert manager.reload("v2") is True  # the lock was freed: the next reload runs

    with never_written.open("wb"):
        pass  # the abandoned loader now returns; what it built must not serve
    _wait_until(lambda: manager.abandoned_loaders_running == 0)
    assert manager.current_version == "v2"
    assert manager.serve(version_of) == "v2"


def test_a_loader_without_arguments_as_in_the_operations_guide_is_accepted() -> None:
    def load_model() -> Tiny:
        return Tiny("guide")

    manager: HotReloadManager[Tiny] = HotReloadManager(
        model_loader=load_model, warmup_func=warmup, warmup_steps=1
    )
    assert manager.initialize_first_worker().version == "guide"
    assert manager.reload() is True
    assert manager.serve(version_of) == "guide"


def test_on_done_gets_the_finished_record_before_the_next_reload_may_start() -> None:
    manager = make_manager(Loader(fail={"broken"}))
    seen: list[tuple[ReloadResult | None, bool]] = []

    def on_done(record: ReloadRecord) -> None:
        seen.append((record.result, manager.reloading))

    assert manager.start_reload("v2", on_done=on_done).done.wait(30)
    assert manager.start_reload("broken", on_done=on_done).done.wait(30)
    assert seen == [(ReloadResult.SUCCESS, True), (ReloadResult.LOAD_FAILED, True)]


def test_a_shutdown_during_a_reload_stops_the_new_worker_and_ends_the_reload_cleanly() -> None:
    loading, release = threading.Event(), threading.Event()
    base = Loader()
    built: list[Tiny] = []

    def loader(version: str | None) -> Tiny:
        if version == "v2":
            loading.set()
            assert release.wait(30)
        model = base(version)
        built.append(model)
        return model

    observer = RecordingObserver()
    manager = make_manager(loader, observer=observer)  # type: ignore[arg-type]
    record = manager.start_reload("v2")
    assert loading.wait(30)
    manager.shutdown()  # the process is exiting while v2 loads
    release.set()
    assert record.done.wait(30), "the reload never ended"

    # No exception escaped the reload thread: it ended as a refusal, with the reason.
    assert record.result is ReloadResult.REJECTED
    assert record.error is not None and record.error["reason"] == "shut_down"
    assert not manager.reloading
    with pytest.raises(NoModelLoaded):  # nothing was switched in after the shutdown
        manager.serve(version_of)
    assert [m.version for m in built] == ["v1", "v2"]  # v2 was built, then stopped unserved
    assert observer.results == [ReloadResult.REJECTED]
