"""Hot reloads of the brief LLM line under load, with a real uvicorn server on loopback.

8 concurrent clients call /dna/create in all three modes while 5 reloads of the brief model
(tiny random Qwen2 exports in exports/brief_llm/) run through the admin API with
{"model": "brief_llm"}. Every response must be 2xx, name both model versions, and each client
must see the brief model's version only move forward; the policy's version never moves.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from serving_server import AUTH, ServerProcess

from lightning_fragrance.serving.loading import export, read_current
from lightning_fragrance.serving.random_brief_model import export_random_brief_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8
MODES = ("fast", "balanced", "creative")
TEXTS = ["fresh citrus for summer", "warm amber for winter", "a green floral", "여름 시트러스"]


@dataclass
class ClientLog:
    statuses: list[int] = field(default_factory=list)
    brief_versions: list[str] = field(default_factory=list)
    policy_versions: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


async def client_loop(url: str, log: ClientLog, stop: asyncio.Event, index: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        while not stop.is_set():
            n = len(log.statuses)
            body = {"user_text": TEXTS[(index + n) % len(TEXTS)], "mode": MODES[n % 3]}
            try:
                response = await client.post("/dna/create", json=body)
            except httpx.HTTPError as exc:
                log.errors.append(repr(exc))
                continue
            log.statuses.append(response.status_code)
            log.brief_versions.append(response.headers.get("X-Brief-Model-Version", ""))
            log.policy_versions.add(response.headers.get("X-Model-Version", ""))
            log.sources.add(response.headers.get("X-Brief-Source", ""))


async def drive_reloads(
    url: str, versions: list[str], stop: asyncio.Event
) -> list[dict[str, object]]:
    records = []
    async with httpx.AsyncClient(base_url=url, timeout=60.0, headers=AUTH) as admin:
        for version in versions:
            await asyncio.sleep(0.5)  # let requests pile up on the serving version
            response = await admin.post(
                "/admin/model/reload", json={"model": "brief_llm", "version": version}
            )
            assert response.status_code == 202, response.text
            reload_id = response.json()["reload_id"]
            while True:
                record = (await admin.get(f"/admin/model/reload/{reload_id}")).json()
                if record["finished_at"] is not None:
                    break
                await asyncio.sleep(0.05)
            records.append(record)
        await asyncio.sleep(0.5)
    stop.set()
    return records


async def run_load(
    url: str, versions: list[str]
) -> tuple[list[ClientLog], list[dict[str, object]]]:
    stop = asyncio.Event()
    logs = [ClientLog() for _ in range(CLIENTS)]
    clients = [asyncio.create_task(client_loop(url, logs[i], stop, i)) for i in range(CLIENTS)]
    records = await asyncio.wait_for(drive_reloads(url, versions, stop), 300)
    await asyncio.wait_for(asyncio.gather(*clients), 120)
    return logs, records


def test_brief_llm_reloads_under_load_drop_nothing_and_versions_only_move_forward(
    tmp_path: Path,
    ppo_checkpoints: list[Path],
    server_factory: Callable[..., ServerProcess],
) -> None:
    root = tmp_path / "exports"
    policy = export(ppo_checkpoints[0], root, make_current=True).name
    names = [p.name for p in export_random_brief_models(root, seeds=(1, 2, 3, 4, 5, 6))]
    server = server_factory(root, brief_backend="llm", drain_timeout_s=60.0, request_timeout_s=60.0)

    logs, records = asyncio.run(run_load(server.url, names[1:]))

    assert [r["result"] for r in records] == ["success"] * 5
    assert all(r["model"] == "brief_llm" for r in records)
    assert read_current(root / "brief_llm") == names[-1]
    assert read_current(root) == policy
    for index, log in enumerate(logs):
        assert log.errors == [], f"client {index}: {log.errors[:3]}"
        assert set(log.statuses) == {200}, f"client {index}: {sorted(set(log.statuses))}"
        assert log.brief_versions == sorted(log.brief_versions), f"client {index} went back"
        assert log.policy_versions == {policy}
        assert log.sources == {"rules_fallback"}  # random weights write no brief
    seen = set().union(*(set(log.brief_versions) for log in logs))
    assert names[0] in seen and names[-1] in seen
    body = httpx.get(f"{server.url}/admin/model", headers=AUTH).json()
    assert body["models"]["brief_llm"]["current"]["version"] == names[-1]
    assert body["models"]["policy"]["current"]["version"] == policy
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()
