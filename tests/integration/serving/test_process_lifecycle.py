"""Process-level behaviour with real uvicorn: SIGTERM ordering, and two workers converging."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from serving_server import AUTH, ServerProcess

from lightning_fragrance.serving.loading import export, read_current

pytestmark = [pytest.mark.integration]

BODY = {"user_text": "fresh citrus for summer", "mode": "fast"}


async def _sigterm_timeline(server: ServerProcess) -> list[tuple[float, str, object]]:
    """Traffic and probes around a SIGTERM: (time, kind, status or error) events."""
    events: list[tuple[float, str, object]] = []
    done = asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as http:
            while not done.is_set():
                try:
                    response = await http.post("/dna/create", json=BODY)
                    events.append((time.monotonic(), "dna", response.status_code))
                except httpx.TransportError as exc:
                    events.append((time.monotonic(), "dna", type(exc).__name__))
                    return

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=2.0) as http:
            while not done.is_set():
                for path in ("/ready", "/health"):
                    try:
                        status: object = (await http.get(path)).status_code
                    except httpx.TransportError as exc:
                        status = type(exc).__name__
                    events.append((time.monotonic(), path, status))
                await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(client()) for _ in range(4)] + [asyncio.create_task(probe())]
    await asyncio.sleep(1.0)
    events.append((time.monotonic(), "signal", "SIGTERM"))
    server.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(server.process.wait, 30)
    done.set()
    await asyncio.gather(*tasks)
    return sorted(events, key=lambda e: e[0])


def test_sigterm_turns_ready_503_first_then_drains_and_exits(
    tmp_path: Path,
    ppo_checkpoints: list[Path],
    server_factory: Callable[..., ServerProcess],
) -> None:
    root = tmp_path / "exports"
    export(ppo_checkpoints[0], root, make_current=True)
    server = server_factory(root, shutdown_ready_delay_s=1.0, graceful_shutdown_s=10.0)

    events = asyncio.run(_sigterm_timeline(server))

    signalled = next(t for t, kind, _ in events if kind == "signal")
    before = [e for e in events if e[0] < signalled]
    assert {s for _, k, s in before if k == "dna"} == {200}
    assert {s for _, k, s in before if k == "/ready"} == {200}
    first_not_ready = next(t for t, k, s in events if k == "/ready" and s == 503)
    closed = min(t for t, _, s in events if isinstance(s, str) and s != "SIGTERM")
    # Readiness turned 503 while the listener still served: liveness and traffic kept working.
    assert first_not_ready < closed
    window = [e for e in events if first_not_ready <= e[0] < closed]
    assert {s for _, k, s in window if k == "/health"} == {200}
    assert {s for _, k, s in window if k == "dna"} == {200}
    assert any(k == "dna" for _, k, _ in window)
    # Every answer was a success; only connection errors after the listener closed.
    assert {s for _, k, s in events if k == "dna" and isinstance(s, int)} == {200}
    assert server.process.returncode in (0, -signal.SIGTERM)
    log = server.log()
    assert log.index("SIGTERM: /ready now 503") < log.index("Shutting down")
    assert "Application shutdown complete" in log


def test_two_uvicorn_workers_converge_on_the_version_of_an_admin_reload(
    tmp_path: Path,
    ppo_checkpoints: list[Path],
    server_factory: Callable[..., ServerProcess],
) -> None:
    root = tmp_path / "exports"
    first = export(ppo_checkpoints[0], root, make_current=True).name
    second = export(ppo_checkpoints[1], root).name
    server = server_factory(root, workers=2)

    def readiness() -> dict[int, str]:
        seen: dict[int, str] = {}
        for _ in range(40):  # a fresh connection each time lets the kernel pick either worker
            body = httpx.get(f"{server.url}/ready", headers={"Connection": "close"}).json()
            seen[body["pid"]] = body["version"]
        return seen

    deadline = time.monotonic() + 60
    seen = readiness()
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.update(readiness())
    assert len(seen) == 2 and set(seen.values()) == {first}

    response = httpx.post(
        f"{server.url}/admin/model/reload", json={"version": second}, headers=AUTH
    )
    assert response.status_code == 202
    while time.monotonic() < deadline:
        seen.update(readiness())
        if set(seen.values()) == {second} and len(seen) == 2:
            break
        time.sleep(0.1)
    assert set(seen.values()) == {second}, seen
    assert read_current(root) == second
    versions = {
        httpx.post(f"{server.url}/dna/create", json=BODY, headers={"Connection": "close"}).headers[
            "X-Model-Version"
        ]
        for _ in range(40)
    }
    assert versions == {second}


def test_a_restart_whose_current_names_a_nan_export_serves_the_newest_valid_one_degraded(
    tmp_path: Path,
    ppo_checkpoints: list[Path],
    server_factory: Callable[..., ServerProcess],
) -> None:
    from safetensors.torch import load_file, save_file

    from lightning_fragrance.serving.loading import (
        MANIFEST_FILE,
        WEIGHTS_FILE,
        sha256_file,
        write_current,
    )

    root = tmp_path / "exports"
    good = export(ppo_checkpoints[0], root, make_current=True).name
    bad = export(ppo_checkpoints[1], root)
    weights = load_file(str(bad / WEIGHTS_FILE))
    weights["obs_normalizer.var"] = -weights["obs_normalizer.var"] - 1.0  # finite, acts NaN
    save_file(weights, str(bad / WEIGHTS_FILE))
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"], entry["bytes"] = sha256_file(bad / name), (bad / name).stat().st_size
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    write_current(root, bad.name)  # what auto-promotion used to do with such an export

    server = server_factory(root)  # used to exit 3 here

    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["version"] == good and ready["degraded"]["wanted"] == bad.name
    response = httpx.post(f"{server.url}/dna/create", json=BODY)
    assert response.status_code == 200 and response.headers["X-Model-Version"] == good
    assert read_current(root) == bad.name
    assert f"DEGRADED [policy]: CURRENT names {bad.name}" in server.log()
