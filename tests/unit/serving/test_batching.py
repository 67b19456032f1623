"""Dynamic batching of generate calls: the pure choice of the next batch, and the thread."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future

import pytest

from lightning_fragrance.monitoring import BriefMode
from lightning_fragrance.serving.batching import (
    BatcherClosed,
    GenerationBatcher,
    PendingRequest,
    choose_batch,
)

FAST, BALANCED = BriefMode.FAST, BriefMode.BALANCED


def queues(**waiting: list[float]) -> dict[BriefMode, deque[PendingRequest]]:
    out: dict[BriefMode, deque[PendingRequest]] = {mode: deque() for mode in BriefMode}
    for mode, times in waiting.items():
        out[BriefMode(mode)].extend(PendingRequest("t", BriefMode(mode), at) for at in times)
    return out


def test_nothing_queued_means_wait_for_a_request() -> None:
    choice = choose_batch(queues(), 10.0, max_batch_size=4, max_wait_s=0.01)
    assert choice.mode is None and choice.wait_s == float("inf")


def test_a_partial_batch_waits_out_the_rest_of_its_oldest_requests_wait() -> None:
    choice = choose_batch(queues(fast=[10.0, 10.002]), 10.004, max_batch_size=4, max_wait_s=0.01)
    assert choice.mode is None and choice.wait_s == pytest.approx(0.006)


def test_a_partial_batch_runs_once_its_oldest_request_waited_max_wait() -> None:
    choice = choose_batch(queues(fast=[10.0]), 10.01, max_batch_size=4, max_wait_s=0.01)
    assert choice.mode is FAST


def test_a_full_batch_runs_at_once_even_behind_an_older_partial_one() -> None:
    state = queues(fast=[10.0], balanced=[10.001, 10.002])
    choice = choose_batch(state, 10.003, max_batch_size=2, max_wait_s=1.0)
    assert choice.mode is BALANCED and choice.wait_s == 0.0


def test_the_mode_with_the_oldest_request_goes_first() -> None:
    state = queues(fast=[10.002], balanced=[10.0])
    assert choose_batch(state, 11.0, max_batch_size=8, max_wait_s=0.01).mode is BALANCED


class RecordingModel:
    """A model stand-in that answers text.upper() and records each batch it ran."""

    def __init__(self) -> None:
        self.batches: list[tuple[BriefMode, list[str]]] = []

    def run(self, texts: list[str], mode: BriefMode) -> list[str]:
        self.batches.append((mode, list(texts)))
        return [text.upper() for text in texts]


def test_concurrent_requests_of_one_mode_share_a_batch_and_get_their_own_answers() -> None:
    model = RecordingModel()
    # A minute's wait: only a full batch can run, so one run proves the sharing.
    batcher = GenerationBatcher(model.run, max_batch_size=8, max_wait_s=60.0)
    futures = [batcher.submit(f"text {i}", FAST) for i in range(8)]
    assert [f.result(10) for f in futures] == [f"TEXT {i}" for i in range(8)]
    assert model.batches == [(FAST, [f"text {i}" for i in range(8)])]
    assert batcher.stats.mean_batch_size == 8.0


def test_a_batch_never_mixes_modes() -> None:
    model = RecordingModel()
    batcher = GenerationBatcher(model.run, max_batch_size=8, max_wait_s=0.05)
    futures = [batcher.submit(str(i), FAST if i % 2 else BALANCED) for i in range(6)]
    for future in futures:
        future.result(10)
    for mode, texts in model.batches:
        assert all((int(t) % 2 == 1) == (mode is FAST) for t in texts)


def test_an_exception_in_generate_reaches_every_request_of_the_batch() -> None:
    def broken(texts: list[str], mode: BriefMode) -> list[str]:
        raise RuntimeError("out of memory")

    batcher = GenerationBatcher(broken, max_batch_size=4, max_wait_s=0.05)
    futures = [batcher.submit("x", FAST) for _ in range(3)]
    for future in futures:
        with pytest.raises(RuntimeError, match="out of memory"):
            future.result(10)


def test_close_answers_what_is_queued_ends_the_thread_and_refuses_more() -> None:
    model = RecordingModel()
    batcher = GenerationBatcher(model.run, max_batch_size=8, max_wait_s=60.0)
    pending: Future[str] = batcher.submit("queued", FAST)
    batcher.close()  # no 60 s wait: a closing batcher runs what it holds at once
    assert pending.result(10) == "QUEUED"
    thread = batcher._thread
    if thread is not None:
        thread.join(10)
    assert batcher._thread is None
    with pytest.raises(BatcherClosed):
        batcher.submit("late", FAST)


def test_the_thread_ends_when_idle_and_a_new_request_starts_another() -> None:
    model = RecordingModel()
    batcher = GenerationBatcher(model.run, max_batch_size=2, max_wait_s=0.0, idle_exit_s=0.05)
    assert batcher.submit("a", FAST).result(10) == "A"
    first_thread = batcher._thread
    if first_thread is not None:
        first_thread.join(10)
    assert batcher._thread is None
    assert batcher.submit("b", FAST).result(10) == "B"


def test_close_with_a_wait_returns_only_after_the_batch_in_flight_was_generated() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def slow(texts: list[str], mode: BriefMode) -> list[str]:
        started.set()
        assert release.wait(10)
        finished.extend(texts)
        return [t.upper() for t in texts]

    batcher = GenerationBatcher(slow, max_batch_size=8, max_wait_s=0.0)
    pending = batcher.submit("running", FAST)
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    batcher.close(wait_s=10)  # a process exiting now must not abort a generate mid-way
    assert finished == ["running"] and pending.done()
    assert batcher._thread is None
