"""The collector under a real ``uvicorn --workers 2``: /metrics counts every worker's requests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lightning_fragrance.monitoring.servers import free_port

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
REPO = HERE.parents[2]


@pytest.fixture
def two_worker_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [sys.executable, "-m", "uvicorn", "multiproc_app:app", "--app-dir", str(HERE)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--log-level", "warning"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/metrics", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        os.kill(process.pid, signal.SIGTERM)  # uvicorn's supervisor stops its workers
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)


def _value(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name}{labels} not exposed")


def test_metrics_of_all_uvicorn_workers_are_merged(two_worker_server: str) -> None:
    pids: set[int] = set()
    sent = 0
    # New connection per request so the kernel spreads them; stop once both workers answered.
    while sent < 400 and (len(pids) < 2 or sent < 20):
        with httpx.Client(timeout=5) as client:
            response = client.post(f"{two_worker_server}/brief/creative")
        response.raise_for_status()
        pids.add(response.json()["pid"])
        sent += 1
    assert len(pids) == 2, "both workers must have served requests"

    text = httpx.get(f"{two_worker_server}/metrics", timeout=5).text
    labels = {"endpoint": "/brief/{mode}", "method": "POST", "status": "200"}
    assert _value(text, "api_request_total", labels) == sent
    assert _value(text, "llm_brief_total", {"mode": "creative", "status": "success"}) == sent
    assert _value(text, "model_info", {"role": "current", "version": "000001-step10"}) == 1
    assert _value(text, "inflight_requests", {}) == 0
