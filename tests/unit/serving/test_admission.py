"""Long-body admission: a token bucket in front of ``/dna/create`` for costly texts only."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from lightning_fragrance.serving.admission import LongBodyAdmission, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_admits_a_burst_then_paces_and_refuses_past_the_longest_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=2, clock=clock)
    assert bucket.reserve(max_wait=1.0) == 0.0
    assert bucket.reserve(max_wait=1.0) == 0.0
    assert bucket.reserve(max_wait=1.0) == pytest.approx(0.1)  # queued behind the burst
    assert bucket.reserve(max_wait=0.1) is None  # would wait 0.2 s
    clock.now += 1.0
    assert bucket.reserve(max_wait=0.0) == 0.0


async def _echo(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_short_bodies_pass_at_once_and_long_ones_beyond_the_rate_get_429_with_retry_after() -> None:
    app = LongBodyAdmission(
        _echo, paths={"/dna/create"}, threshold_bytes=100, rate=1.0, burst=2, max_wait_s=0.0
    )

    async def scenario() -> list[int]:
        async with _client(app) as client:
            codes = []
            for _ in range(20):  # short bodies are never counted or delayed
                response = await client.post("/dna/create", content=b"x" * 50)
                codes.append(response.status_code)
            long_codes = []
            for _ in range(3):
                response = await client.post("/dna/create", content=b"x" * 500)
                long_codes.append(response.status_code)
                if response.status_code == 429:
                    assert response.headers["retry-after"] == "1"
                    assert "bodies over 100 bytes" in response.json()["detail"]
            other = await client.post("/health", content=b"x" * 500)  # other paths: untouched
            return codes + long_codes + [other.status_code]

    codes = asyncio.run(scenario())
    assert codes[:20] == [200] * 20
    assert codes[20:23] == [200, 200, 429]
    assert codes[23] == 200


def test_the_service_puts_dna_create_behind_the_long_body_admission(
    tmp_path: Any, ppo_checkpoints: list[Any]
) -> None:
    from prometheus_client import CollectorRegistry

    from lightning_fragrance.monitoring import OperationsMetricsCollector
    from lightning_fragrance.serving.app import create_app
    from lightning_fragrance.serving.loading import export
    from lightning_fragrance.serving.settings import ServeSettings

    root = tmp_path / "exports"
    export(ppo_checkpoints[0], root, make_current=True)
    settings = ServeSettings(export_dir=root, warmup_steps=1)
    app = create_app(settings, collector=OperationsMetricsCollector(registry=CollectorRegistry()))
    [admission] = [m for m in app.user_middleware if m.cls is LongBodyAdmission]
    assert "/dna/create" in admission.kwargs["paths"]
