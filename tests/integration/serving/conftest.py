"""Fixtures for the serving integration tests: real checkpoints and real uvicorn servers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The tests here import their shared module (`serving_server`) by name under any import mode;
# the `ppo_checkpoints` fixture comes from tests/conftest.py.
sys.path.insert(0, str(Path(__file__).parent))
from serving_server import ServerProcess, start_server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def factory(export_dir: Path, **overrides: object) -> ServerProcess:
        server = start_server(export_dir, tmp_path, **overrides)
        started.append(server)
        server.wait_ready()
        return server

    yield factory
    for server in started:
        server.stop()
