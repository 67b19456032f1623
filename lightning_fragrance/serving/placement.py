"""Where a request's model work runs: on the event loop, or in a thread pool.

Handing small work to a thread costs more than the work. Each torch call releases the GIL
and has to win it back from the event loop, and both threads then fight for one core's worth
of Python.

Measured on the 2-core machine with 8 clients, for a ``/dna/create`` whose work is 0.8 ms:

| where the work ran | process CPU per request | requests/s |
|---|---|---|
| the pool | 4.3 ms | 234 |
| inline | 2.2 ms | 458 |

Work that stays cheap therefore runs inline. Slower work (an LLM brief, a large policy) goes
to the pool. Then the loop keeps answering ``/ready`` and ``/health``, and the request
timeout applies.

Measuring is the hard part, because contention inflates the times:

- A pooled request waits for the GIL, so its wall time is several times its cost inline.
  Its CPU time is inflated 2-3x, and misses work that waits on I/O.
- An inline request that runs while pooled work still holds threads shares the GIL with that
  work, so its wall time is inflated too.

So a process starts in the pool. While the pooled wall time is within ``TRIAL_GATE`` times the
limit, every ``probe_every`` pooled requests it tries a *trial*: the next requests run inline
and none go to the pool, so the pool empties. Only inline requests that start with the pool
empty count as clean measurements. Then:

- If the median of ``trial_requests`` clean measurements is under the limit, the work stays
  inline, and its running mean keeps being watched. A reload to a slower model sends it back
  to the pool.
- If not, the work goes back to the pool, and the next trial waits twice as long. One trial
  request slower than ``FAIL_FACTOR`` times the limit ends the trial at once, so a trial
  blocks the loop for about one slow request at most.

Pure policy, no I/O, no framework: the service calls ``next_inline`` and ``observe`` from its
event loop thread only.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from enum import Enum

# Pooled work is tried inline only while its pooled wall time is under this multiple of the
# limit. With 8 clients and 4 pool threads, 0.8 ms of work took about 5 ms of pooled wall time;
# work that waits seconds on I/O never gets a trial.
TRIAL_GATE = 25.0
# A trial request slower than this multiple of the limit ends the trial (no need for more).
FAIL_FACTOR = 4.0
MAX_PROBE_EVERY = 4096


class Placement(str, Enum):
    """Where requests run now."""

    POOL = "pool"
    TRIAL = "trial"
    INLINE = "inline"


def _running_mean(mean: float | None, sample: float) -> float:
    # Weight 1/8: a reload to a slower model moves the work within a few requests, and one
    # slow request (a GC pause) does not.
    return sample if mean is None else mean + (sample - mean) / 8


@dataclass
class WorkPlacement:
    """Chooses inline or pool for each request from measured work times (see the module doc).

    Attributes:
        limit_s: work whose inline mean is under this runs on the loop; 0 = always the pool.
        probe_every: pooled requests between trials (doubles after a failed trial).
        trial_requests: clean inline measurements that decide a trial.
    """

    limit_s: float
    probe_every: int = 16
    trial_requests: int = 8
    placement: Placement = Placement.POOL
    inline_mean_s: float | None = None
    pooled_mean_s: float | None = None
    pooled_since_trial: int = 0
    pool_inflight: int = 0
    trials: int = 0
    _trial_samples: list[float] = field(default_factory=list)
    _trial_runs: int = 0
    _initial_probe_every: int = 0

    def __post_init__(self) -> None:
        self._initial_probe_every = self.probe_every

    def next_inline(self) -> bool:
        """Whether the next request's work runs on the event loop."""
        if self.limit_s <= 0:
            return False
        if self.placement is Placement.POOL and self._trial_due():
            self.placement = Placement.TRIAL
            self.trials += 1
            self._trial_samples.clear()
            self._trial_runs = 0
        return self.placement is not Placement.POOL

    def pool_job_done(self) -> None:
        """A pooled request's work ended (called on the loop thread)."""
        self.pool_inflight -= 1

    def clean(self) -> bool:
        """Whether inline work starting now would run alone (nothing in the pool)."""
        return self.pool_inflight == 0

    def observe(self, seconds: float, *, inline: bool, clean: bool = True) -> None:
        """Record one request's work time.

        Args:
            seconds: the work's wall time.
            inline: where it ran.
            clean: for inline work, whether the pool was empty when it started.
        """
        if not inline:
            self.pooled_mean_s = _running_mean(self.pooled_mean_s, seconds)
            self.pooled_since_trial += 1
            return
        if self.placement is Placement.TRIAL:
            self._trial_runs += 1
            if clean:
                self._trial_samples.append(seconds)
            if seconds >= FAIL_FACTOR * self.limit_s:
                self._end_trial(None)
            elif len(self._trial_samples) >= self.trial_requests:
                self._end_trial(statistics.median(self._trial_samples))
            elif self._trial_runs >= 4 * self.trial_requests:
                self._end_trial(None)  # the pool never emptied (a stuck request): give up
        elif self.placement is Placement.INLINE and clean:
            self.inline_mean_s = _running_mean(self.inline_mean_s, seconds)
            if self.inline_mean_s >= self.limit_s:
                self._to_pool()

    def as_dict(self) -> dict[str, object]:
        """What ``GET /admin/model`` shows (times in ms)."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1e3, 3)

        return {
            "placement": self.placement.value,
            "limit_ms": ms(self.limit_s),
            "inline_mean_ms": ms(self.inline_mean_s),
            "pooled_mean_ms": ms(self.pooled_mean_s),
            "trials": self.trials,
            "probe_every": self.probe_every,
        }

    def _trial_due(self) -> bool:
        return (
            self.pooled_since_trial >= self.probe_every
            and self.pooled_mean_s is not None
            and self.pooled_mean_s < TRIAL_GATE * self.limit_s
        )

    def _end_trial(self, median_s: float | None) -> None:
        if median_s is not None and median_s < self.limit_s:
            self.placement = Placement.INLINE
            self.inline_mean_s = median_s
            self.probe_every = self._initial_probe_every
            return
        self.probe_every = min(2 * self.probe_every, MAX_PROBE_EVERY)
        self._to_pool()

    def _to_pool(self) -> None:
        self.placement = Placement.POOL
        self.pooled_since_trial = 0
