"""The brief LLM model line on a real (tiny, random) Qwen2 export: batching, reload, drain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lightning_fragrance.labels import ReloadPhase, ReloadResult
from lightning_fragrance.monitoring import BriefMode, OperationsMetricsCollector
from lightning_fragrance.serving.batching import BatcherClosed
from lightning_fragrance.serving.brief_line import (
    DEFAULT_LLM_DECODING,
    BriefLLMLine,
    BriefLLMSettings,
)
from lightning_fragrance.serving.loading import ExportStore, read_current

V1, V2 = "000001-step1", "000002-step2"
TEXTS = [
    "fresh citrus",
    "warm amber and vanilla for winter evenings, cosy and soft",
    "a green floral",
    "여름에 어울리는 상큼한 시트러스 향",
    "not too sweet",
    "smoky woods with leather, strong",
]


def make_line(store: Path, **overrides: object) -> BriefLLMLine:
    values: dict[str, object] = {"decoding": DEFAULT_LLM_DECODING, "drain_timeout_s": 60.0}
    values.update(overrides)
    return BriefLLMLine(ExportStore(store), BriefLLMSettings(**values))  # type: ignore[arg-type]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def test_greedy_answers_are_identical_batched_and_one_at_a_time(brief_llm_store: Path) -> None:
    line = make_line(brief_llm_store, max_batch_size=len(TEXTS), batch_wait_s=60.0)
    line.sync.start()
    # All six wait for each other (a minute's wait, a batch of six): one generate call.
    futures = [line.submit(text, BriefMode.FAST) for text in TEXTS]
    batched = [f.result(60)[0] for f in futures]
    with line.manager.lease() as lease:
        assert lease.model.batcher.stats.batches == 1
        alone = [lease.model.generate_batch([text], BriefMode.FAST)[0] for text in TEXTS]
    assert batched == alone
    # Not vacuous: the random model writes answers of different lengths (padding is exercised).
    assert len({len(answer) for answer in alone}) > 1
    line.manager.shutdown()


def test_a_reload_drains_only_after_the_generate_in_flight_on_the_old_version(
    brief_llm_store: Path,
) -> None:
    line = make_line(brief_llm_store, max_batch_size=2, batch_wait_s=60.0)
    line.sync.start()
    with line.manager.lease() as lease:
        old_model = lease.model
    pending = line.submit("fresh citrus", BriefMode.FAST)  # waits for a second request
    record = line.sync.reload(V2)
    wait_for(lambda: record.phase is ReloadPhase.DRAINING)
    assert line.manager.current_version == V2  # new requests already go to v2...
    assert not pending.done() and not record.done.is_set()  # ...the drain waits for v1's
    old_model.batcher.submit("a companion", BriefMode.FAST)  # completes v1's batch of two
    assert pending.result(60)[1] == V1
    assert record.done.wait(60) and record.result is ReloadResult.SUCCESS
    assert read_current(brief_llm_store) == V2
    with pytest.raises(BatcherClosed):  # stopping v1 closed its batcher (no thread holds it)
        old_model.batcher.submit("late", BriefMode.FAST)
    line.manager.shutdown()


def test_an_answer_is_interpreted_recorded_and_names_its_version(brief_llm_store: Path) -> None:
    collector = OperationsMetricsCollector(registry=CollectorRegistry())
    line = BriefLLMLine(
        ExportStore(brief_llm_store),
        BriefLLMSettings(decoding=DEFAULT_LLM_DECODING),
        collector=collector,
    )
    line.sync.start()
    brief = asyncio.run(line.generate("fresh citrus for summer", BriefMode.CREATIVE, timeout_s=60))
    assert brief.version == V1
    # Random weights write no JSON: the rules answer, and the metrics say so.
    assert brief.result.source.value == "rules_fallback"
    text = collector.exposition().decode()
    assert 'llm_brief_total{mode="creative",status="failure"} 1.0' in text
    assert 'llm_brief_repairs_total{mode="creative",repair_type="rule_fallback"} 1.0' in text
    line.manager.shutdown()


def test_a_line_without_exports_fails_its_first_load_with_the_way_out(tmp_path: Path) -> None:
    line = make_line(tmp_path / "brief_llm")
    with pytest.raises(Exception, match="lf-train task=brief_llm"):
        line.sync.start()


def test_a_request_that_times_out_still_gives_its_lease_back_when_generate_ends(
    brief_llm_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    line = make_line(brief_llm_store, max_batch_size=2, batch_wait_s=60.0)
    line.sync.start()
    with line.manager.lease() as lease:
        model = lease.model

    async def ask() -> None:
        await line.generate("fresh citrus", BriefMode.FAST, timeout_s=0.05)

    with pytest.raises(TimeoutError):
        asyncio.run(ask())  # its text waits in the batcher for a second request
    assert line.manager.get_current_worker_info().in_flight == 1  # the lease is still held
    model.batcher.submit("a companion", BriefMode.FAST).result(60)
    wait_for(lambda: line.manager.get_current_worker_info().in_flight == 0)
    # The late answer lands without an error in the future's callback.
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    line.manager.shutdown()
