"""Admission of long request bodies: a per-process rate for the costly ones.

Normal briefs are short (tens to a few hundred characters); a long text costs several times
more on the request path (parsing, validation, the brief stage), and a few clients sending
long texts on a loop take the process from everyone else: in `benchmarks/bench_attack_mix.py`
two such connections cut six normal ones to 0.57x of their throughput. Bounding the work per
request (the parser's caps) does not help with that, because every request is admitted at once;
so bodies above ``threshold_bytes`` pass a token bucket (``rate`` per second, ``burst``) and
wait for a token without using the CPU. A body that would wait longer than ``max_wait_s`` gets
429 with ``Retry-After``. Short bodies are never delayed.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

ASGIApp = Callable[..., Awaitable[None]]

DEFAULT_THRESHOLD_BYTES = 1_024
DEFAULT_RATE = 20.0
DEFAULT_BURST = 4
DEFAULT_MAX_WAIT_S = 2.0


class TokenBucket:
    """Tokens refill at ``rate`` per second up to ``burst``; `reserve` books one and says how
    long to wait for it. Single event loop: no lock needed.

    Args:
        rate: Tokens per second (> 0).
        burst: Bucket size (>= 1).
        clock: Seconds, monotonic (injectable for tests).
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError(f"rate={rate} must be > 0 and burst={burst} >= 1")
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens = float(burst)
        self._updated = clock()

    def reserve(self, max_wait: float) -> float | None:
        """Book one token; returns the seconds to wait before using it, or None (nothing
        booked) when that would be longer than ``max_wait``."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        wait = max(0.0, (1.0 - self._tokens) / self.rate)
        if wait > max_wait:
            return None
        self._tokens -= 1.0  # may go negative: later reservations queue behind this one
        return wait


class LongBodyAdmission:
    """ASGI middleware applying `TokenBucket` to long bodies of the given POST paths.

    Args:
        app: The wrapped ASGI app.
        paths: Exact paths to guard (e.g. ``{"/dna/create"}``).
        threshold_bytes: Bodies above this (``Content-Length``; a body without one counts as
            long) pass the bucket.
        rate: Long bodies admitted per second, per process.
        burst: Long bodies admitted at once after a quiet period.
        max_wait_s: Longest wait for a token before answering 429.
    """

    def __init__(
        self,
        app: ASGIApp,
        paths: Collection[str],
        threshold_bytes: int = DEFAULT_THRESHOLD_BYTES,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
    ) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.threshold_bytes = threshold_bytes
        self.max_wait_s = max_wait_s
        self.bucket = TokenBucket(rate, burst)

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if self._is_long(scope):
            wait = self.bucket.reserve(self.max_wait_s)
            if wait is None:
                await _too_many(send, self.bucket.rate, self.threshold_bytes)
                return
            if wait > 0:
                await asyncio.sleep(wait)
        await self.app(scope, receive, send)

    def _is_long(self, scope: MutableMapping[str, Any]) -> bool:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return False
        if scope.get("path") not in self.paths:
            return False
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    return int(value) > self.threshold_bytes
                except ValueError:
                    return True
        return True  # chunked: its length is unknown until read


async def _too_many(send: Callable[[Any], Awaitable[None]], rate: float, limit: int) -> None:
    body = json.dumps(
        {
            "detail": f"too many long requests: bodies over {limit} bytes are admitted at "
            f"{rate:g} per second per process; retry later or send a shorter user_text"
        }
    ).encode()
    retry = str(max(1, math.ceil(1.0 / rate)))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", retry.encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
