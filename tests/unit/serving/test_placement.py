"""WorkPlacement: when ``/dna/create`` work runs on the event loop and when in the pool."""

from __future__ import annotations

from lightning_fragrance.serving.placement import (
    FAIL_FACTOR,
    MAX_PROBE_EVERY,
    TRIAL_GATE,
    Placement,
    WorkPlacement,
)

LIMIT = 0.005


def pooled(placement: WorkPlacement, seconds: float, n: int) -> None:
    for _ in range(n):
        assert not placement.next_inline()
        placement.observe(seconds, inline=False)


def trial(placement: WorkPlacement, seconds: float, n: int | None = None) -> None:
    for _ in range(n or placement.trial_requests):
        assert placement.next_inline()
        placement.observe(seconds, inline=True, clean=placement.clean())


def test_a_new_process_uses_the_pool_until_it_has_measured_the_work() -> None:
    placement = WorkPlacement(limit_s=LIMIT, probe_every=4)
    assert not placement.next_inline()
    pooled(placement, 0.010, 3)
    assert placement.placement is Placement.POOL


def test_cheap_work_moves_inline_after_one_trial() -> None:
    placement = WorkPlacement(limit_s=LIMIT, probe_every=4)
    # The pool's hand-off inflates the time: 10 ms pooled for 1 ms of work.
    pooled(placement, 0.010, 4)
    trial(placement, 0.001)
    assert placement.placement is Placement.INLINE
    assert placement.trials == 1
    assert placement.inline_mean_s == 0.001
    assert all(placement.next_inline() for _ in range(100))


def test_work_over_the_limit_inline_goes_back_to_the_pool_and_backs_off() -> None:
    placement = WorkPlacement(limit_s=LIMIT, probe_every=4)
    pooled(placement, 0.010, 4)
    trial(placement, 0.006)  # over the limit, under FAIL_FACTOR times it
    assert placement.placement is Placement.POOL
    assert placement.probe_every == 8
    pooled(placement, 0.010, 8)
    assert placement.next_inline()  # 8 pooled requests later, the next trial


def test_one_very_slow_trial_request_ends_the_trial_at_once() -> None:
    placement = WorkPlacement(limit_s=LIMIT, probe_every=4)
    pooled(placement, 0.010, 4)
    trial(placement, FAIL_FACTOR * LIMIT, n=1)
    assert placement.placement is Placement.POOL
    assert not placement.next_inline()


def test_work_that_is_slow_in_the_pool_never_gets_a_trial() -> None:
    # e.g. an LLM brief, or work that waits on I/O (its CPU time would look small).
    placement = WorkPlacement(limit_s=LIMIT, probe_every=4)
    pooled(placement, TRIAL_GATE * LIMIT, 200)
    assert placement.trials == 0


def test_trial_requests_that_share_the_gil_with_pooled_work_are_not_measured() -> None:
    placement = WorkPlacement(limit_s=LIMIT, probe_every=4, trial_requests=2)
    pooled(placement, 0.010, 4)
    placement.pool_inflight = 2  # two pooled requests still running
    trial(placement, 0.004, n=3)
    assert placement.placement is Placement.TRIAL
    placement.pool_inflight = 0
    trial(placement, 0.001, n=2)
    assert placement.placement is Placement.INLINE
    assert placement.inline_mean_s == 0.001


def test_a_trial_gives_up_when_the_pool_never_empties() -> None:
    placement = WorkPlacement(limit_s=LIMIT, probe_every=4, trial_requests=2)
    pooled(placement, 0.010, 4)
    placement.pool_inflight = 1  # a stuck request
    trial(placement, 0.001, n=4 * placement.trial_requests)
    assert placement.placement is Placement.POOL


def test_inline_work_that_turns_slow_moves_back_to_the_pool() -> None:
    # A reload to a larger policy: the running mean crosses the limit within a few requests.
    placement = WorkPlacement(limit_s=LIMIT, probe_every=4)
    pooled(placement, 0.010, 4)
    trial(placement, 0.001)
    runs = 0
    while placement.next_inline():
        placement.observe(0.012, inline=True)
        runs += 1
    assert 1 <= runs <= 8
    assert placement.placement is Placement.POOL
    # One slow request (a GC pause) does not move it.
    placement = WorkPlacement(limit_s=LIMIT, probe_every=4)
    pooled(placement, 0.010, 4)
    trial(placement, 0.001)
    placement.observe(0.020, inline=True)
    assert placement.placement is Placement.INLINE


def test_a_limit_of_zero_keeps_all_work_in_the_pool() -> None:
    placement = WorkPlacement(limit_s=0.0, probe_every=1)
    pooled(placement, 0.0001, 100)
    assert placement.trials == 0


def test_the_backoff_is_bounded_and_as_dict_reports_milliseconds() -> None:
    placement = WorkPlacement(limit_s=LIMIT, probe_every=MAX_PROBE_EVERY)
    pooled(placement, 0.010, MAX_PROBE_EVERY)
    trial(placement, 0.006)
    assert placement.probe_every == MAX_PROBE_EVERY
    shown = placement.as_dict()
    assert shown["placement"] == "pool"
    assert shown["limit_ms"] == 5.0
    assert shown["pooled_mean_ms"] == 10.0
    assert shown["trials"] == 1
