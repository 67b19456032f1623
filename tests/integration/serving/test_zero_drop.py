"""Zero dropped requests across hot reloads, with a real uvicorn server on loopback.

8 concurrent clients call /dna/create for at least 20 s while 11 reloads run through the admin
API, one of them with an export that fails to load and one whose warm-up yields NaN. Every
response must be 2xx and every client must see versions only move forward.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file
from serving_server import AUTH, ServerProcess

from lightning_fragrance.serving.loading import MANIFEST_FILE, WEIGHTS_FILE, export, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8
MIN_SECONDS = 20.0
MAX_SECONDS = 90.0
MAX_REQUESTS_PER_CLIENT = 20_000
TEXTS = ["fresh citrus for summer", "warm amber for winter", "a green floral", "woody, no vanilla"]


def _reseal(directory: Path) -> None:
    import json

    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"] = sha256_file(directory / name)
        entry["bytes"] = (directory / name).stat().st_size
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def break_load(directory: Path) -> None:
    (directory / WEIGHTS_FILE).unlink()


def break_warmup(directory: Path) -> None:
    weights = load_file(str(directory / WEIGHTS_FILE))
    weights["obs_normalizer.var"] = -weights["obs_normalizer.var"] - 1.0  # finite, acts NaN
    save_file(weights, str(directory / WEIGHTS_FILE))
    _reseal(directory)


@dataclass
class ClientLog:
    statuses: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def client_loop(url: str, log: ClientLog, stop: asyncio.Event, index: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        while not stop.is_set() and len(log.statuses) < MAX_REQUESTS_PER_CLIENT:
            body = {"user_text": TEXTS[(index + len(log.statuses)) % len(TEXTS)], "mode": "fast"}
            try:
                response = await client.post("/dna/create", json=body)
            except httpx.HTTPError as exc:
                log.errors.append(repr(exc))
                continue
            log.statuses.append(response.status_code)
            log.versions.append(response.headers.get("X-Model-Version", ""))


async def drive_reloads(
    url: str, versions: list[str], stop: asyncio.Event
) -> list[dict[str, object]]:
    records = []
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30.0, headers=AUTH) as admin:
        for version in versions:
            await asyncio.sleep(1.2)
            response = await admin.post("/admin/model/reload", json={"version": version})
            assert response.status_code == 202, response.text
            reload_id = response.json()["reload_id"]
            while True:
                record = (await admin.get(f"/admin/model/reload/{reload_id}")).json()
                if record["finished_at"] is not None:
                    break
                await asyncio.sleep(0.05)
            records.append(record)
        while time.monotonic() - start < MIN_SECONDS:
            await asyncio.sleep(0.1)
    stop.set()
    return records


async def run_load(
    url: str, versions: list[str]
) -> tuple[list[ClientLog], list[dict[str, object]], float]:
    stop = asyncio.Event()
    logs = [ClientLog() for _ in range(CLIENTS)]
    start = time.monotonic()
    clients = [asyncio.create_task(client_loop(url, logs[i], stop, i)) for i in range(CLIENTS)]
    records = await asyncio.wait_for(drive_reloads(url, versions, stop), MAX_SECONDS)
    await asyncio.wait_for(asyncio.gather(*clients), 30)
    return logs, records, time.monotonic() - start


def test_no_request_fails_and_versions_only_move_forward_across_reloads(
    tmp_path: Path,
    ppo_checkpoints: list[Path],
    server_factory: Callable[..., ServerProcess],
) -> None:
    root = tmp_path / "exports"
    names = [export(ppo_checkpoints[i % 2], root, make_current=(i == 0)).name for i in range(12)]
    load_failure, warmup_failure = names[4], names[7]
    break_load(root / load_failure)
    break_warmup(root / warmup_failure)
    server = server_factory(root, drain_timeout_s=10.0)

    logs, records, elapsed = asyncio.run(run_load(server.url, names[1:]))

    assert elapsed >= MIN_SECONDS
    assert len(records) == 11
    results = {r["to_version"] or r["requested_version"]: r["result"] for r in records}
    assert results.pop(load_failure) == "load_failed"
    assert results.pop(warmup_failure) == "warmup_failed"
    assert set(results.values()) == {"success"}
    total = sum(len(log.statuses) for log in logs)
    assert total > CLIENTS * 20, f"only {total} requests in {elapsed:.1f} s"
    for index, log in enumerate(logs):
        assert log.errors == [], f"client {index}: {log.errors[:3]}"
        assert set(log.statuses) == {200}, f"client {index}: {sorted(set(log.statuses))}"
        assert log.versions == sorted(log.versions), f"client {index} saw a version go back"
        assert load_failure not in log.versions and warmup_failure not in log.versions
    seen = set().union(*(set(log.versions) for log in logs))
    assert names[-1] in seen and names[0] in seen
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'model_reload_total{result="load_failed"} 1.0' in metrics
    assert 'model_reload_total{result="warmup_failed"} 1.0' in metrics
    assert 'model_reload_total{result="success"} 9.0' in metrics
    # uvicorn re-raises the SIGTERM it handled after a graceful shutdown (exit by the signal).
    assert server.stop() in (0, -signal.SIGTERM)
    log_text = server.log()
    assert "Application shutdown complete" in log_text
    for line in ("=== Model reload started ===", "Traffic switched: worker-", "] stopped"):
        assert line in log_text
