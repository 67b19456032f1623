"""Fixtures that run a real Prometheus + Pushgateway stack, stopped by PID at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lightning_fragrance.monitoring.servers import MonitoringStack, start_stack


@pytest.fixture(scope="module")
def stack_factory(
    prometheus_binaries: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """Start stacks on free loopback ports, 1 s scrape and rule intervals; stopped by PID."""
    started: list[MonitoringStack] = []

    def start(app_targets: tuple[str, ...] = ()) -> MonitoringStack:
        workdir: Path = tmp_path_factory.mktemp("stack")
        stack = start_stack(
            workdir, app_targets=app_targets, scrape_interval="1s", evaluation_interval="1s"
        )
        started.append(stack)
        return stack

    yield start
    for stack in started:
        stack.stop()
