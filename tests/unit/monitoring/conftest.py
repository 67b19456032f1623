"""Fixtures of the monitoring unit tests."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of ``promtool``; a missing binary fails in CI and skips elsewhere."""
    path = shutil.which("promtool")
    if path is None:
        message = (
            "promtool missing: sudo apt-get install -y prometheus (./scripts/install_prometheus.sh)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the promtool checks; {message}")
        pytest.skip(message)
    return path
