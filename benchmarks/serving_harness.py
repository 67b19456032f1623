"""Shared pieces of the serving benchmarks: an exported policy, server processes, a load loop.

Not a benchmark itself (``run_all.py`` runs only ``bench_*.py``).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from lightning_fragrance.examples.tiny_ppo import tiny_ppo_checkpoints
from lightning_fragrance.serving.launcher import ServeProcess, free_port, start_lf_serve

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "a fresh citrus scent for summer, not too sweet",
    "warm amber and vanilla for winter evenings",
    "a green floral for spring",
    "woody and spicy, no vanilla",
]


def train_checkpoints(directory: Path, steps: int = 2, hidden: int = 64) -> list[Path]:
    """Checkpoints of a short real ``Trainer.fit`` of PPO on the fragrance task (one per step)."""
    return tiny_ppo_checkpoints(directory, steps=steps, hidden=hidden)


__all__ = ["REPO", "TEXTS", "LoadResult", "Server", "free_port", "run_load", "start_ours"]


class Server(ServeProcess):
    """A server subprocess in a process group of its own, stopped by signalling that group.

    LitServe spawns worker processes; ``lf-serve`` with ``workers > 1`` does too.
    """

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        super().__init__(process, url, log, own_group=True)


def start_ours(export_dir: Path, token: str = "bench-token", **overrides: object) -> ServeProcess:
    """``lf-serve`` on a free loopback port (the launcher the demo and the tests use)."""
    settings: dict[str, Any] = {"log_level": "WARNING", **overrides}
    return start_lf_serve(export_dir, token=token, cwd=REPO, own_group=True, **settings)


@dataclass
class LoadResult:
    """Latencies (seconds) of successful requests and the failures, over ``seconds``."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    seconds: float = 0.0
    stamps: list[tuple[float, float]] = field(default_factory=list)  # (start, latency)
    # X-Brief-Source of the 200 answers (llm, llm_repaired, rules_fallback, rules).
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


async def _load(
    url: str,
    path: str,
    clients: int,
    seconds: float,
    warmup: float,
    mode: str = "fast",
    timeout_s: float | None = None,
    texts: Sequence[str] = TEXTS,
) -> LoadResult:
    """``clients`` closed-loop clients posting ``texts`` in turn in ``mode`` (one load generator
    for every serving benchmark); ``timeout_s`` bounds one request (None: aiohttp's default)."""
    result = LoadResult()
    stop_at = time.monotonic() + warmup + seconds
    measure_from = time.monotonic() + warmup

    async def client(index: int) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            n = index
            while (now := time.monotonic()) < stop_at:
                body = {"user_text": texts[n % len(texts)], "mode": mode}
                n += 1
                try:
                    async with session.post(url + path, json=body) as response:
                        await response.read()
                        status = response.status
                        source = response.headers.get("X-Brief-Source", "")
                except aiohttp.ClientError:
                    if now >= measure_from:
                        result.errors += 1
                    continue
                latency = time.monotonic() - now
                if now >= measure_from:
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if status == 200:
                        result.latencies.append(latency)
                        result.stamps.append((now, latency))
                        result.sources[source] = result.sources.get(source, 0) + 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    result.seconds = seconds
    return result


async def reload_loop(
    url: str, token: str, versions: list[str], until: float, model: str | None = None
) -> list[dict[str, object]]:
    """Reload ``versions`` in turn, back to back, until ``until``; the finished records."""
    records: list[dict[str, object]] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as admin:
        index = 0
        while time.monotonic() < until:
            body: dict[str, str] = {"version": versions[index % len(versions)]}
            if model is not None:
                body["model"] = model
            index += 1
            response = await admin.post("/admin/model/reload", json=body)
            if response.status_code != 202:
                await asyncio.sleep(0.05)
                continue
            reload_id = response.json()["reload_id"]
            while True:
                record = (await admin.get(f"/admin/model/reload/{reload_id}")).json()
                if record["finished_at"] is not None:
                    records.append(record)
                    break
                await asyncio.sleep(0.02)
    return records


def reload_process(
    url: str,
    token: str,
    versions: list[str],
    periods: list[tuple[float, float]],
    out: Queue[object],
    model: str | None = None,
) -> None:
    """`reload_loop` inside each (start, end) period, in its own process so its polling never
    slows the load generator; CLOCK_MONOTONIC is system-wide on Linux, so the parent's
    deadlines hold here. Puts the records on ``out``."""
    records: list[dict[str, object]] = []
    for start, end in periods:
        time.sleep(max(0.0, start - time.monotonic()))
        records += asyncio.run(reload_loop(url, token, versions, end, model))
    out.put(records)


def run_load(
    url: str, path: str, clients: int = 8, seconds: float = 8.0, warmup: float = 1.5
) -> LoadResult:
    """``clients`` closed-loop clients (keep-alive) for ``seconds`` after ``warmup``."""
    return asyncio.run(_load(url, path, clients, seconds, warmup))


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
