"""``make monitoring`` (local_stack) and the demo's summary helpers, with the real binaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_fragrance.monitoring.servers import free_port, is_ready
from lightning_fragrance.monitoring.summary import local_pushgateway

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_local_stack_starts_prints_the_import_command_and_stops_both_by_pid(
    prometheus_binaries: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = [free_port(), free_port()]
    argv = [sys.executable, "-m", "lightning_fragrance.monitoring.local_stack"]
    argv += ["--prometheus-port", str(ports[0]), "--pushgateway-port", str(ports[1])]
    argv += ["--workdir", str(tmp_path)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stack_file = tmp_path / "stack.json"
    try:
        deadline = time.monotonic() + 30
        while not stack_file.exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()  # type: ignore[union-attr]
            time.sleep(0.1)
        stack = json.loads(stack_file.read_text())
        assert is_ready(f"http://{stack['prometheus']}")

        monkeypatch.delenv("PUSHGATEWAY_URL", raising=False)
        assert local_pushgateway(stack_file) == stack["pushgateway"]
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)

    assert "/api/dashboards/db" in output and "--import-body" in output
    assert "logger.pushgateway_url=" in output
    assert not _alive(stack["pids"]["prometheus"]) and not _alive(stack["pids"]["pushgateway"])
    assert not stack_file.exists()


def test_no_pushgateway_is_found_when_none_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHGATEWAY_URL", f"127.0.0.1:{free_port()}")
    monkeypatch.setattr("lightning_fragrance.monitoring.summary.DEFAULT_PUSHGATEWAY", "")
    assert local_pushgateway(tmp_path / "missing.json") is None
