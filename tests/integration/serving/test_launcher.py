"""The one launcher of `lf-serve` (demo, tests, benchmarks): ready means /ready answers 200."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from lightning_fragrance.serving.launcher import ServeProcessError, start_lf_serve
from lightning_fragrance.serving.loading import export

pytestmark = [pytest.mark.integration]


def test_the_launcher_returns_a_server_that_answers_on_loopback_and_stops_gracefully(
    tmp_path: Path, ppo_checkpoints: list[Path]
) -> None:
    version = export(ppo_checkpoints[0], tmp_path / "exports", make_current=True).name
    server = start_lf_serve(tmp_path / "exports", token="t", log_path=tmp_path / "serve.log")
    try:
        server.wait_ready(timeout=120)
        assert server.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{server.url}/ready").json()["version"] == version
        admin = httpx.get(f"{server.url}/admin/model", headers={"Authorization": "Bearer t"})
        assert admin.status_code == 200
    finally:
        returncode = server.stop()
    assert returncode in (0, -signal.SIGTERM)  # as in test_process_lifecycle
    assert "Application shutdown complete" in server.log()


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    (tmp_path / "exports").mkdir()  # no export at all: lf-serve exits at startup
    server = start_lf_serve(tmp_path / "exports", log_path=tmp_path / "serve.log")
    try:
        with pytest.raises(ServeProcessError, match="exited with") as info:
            server.wait_ready(timeout=120)
    finally:
        server.stop()
    assert "no complete export" in str(info.value)
