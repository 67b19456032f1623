"""Shared fixtures of the integration tests: the real Prometheus binaries.

The metrics integration tests run real ``prometheus`` and ``prometheus-pushgateway`` processes
(Debian packages). Without them a developer's run skips those tests with the install command;
in CI (``CI`` set) a missing binary is a failure, never a skip (issue 4).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# Helper modules shared by the integration tests (e.g. `multirank`) sit beside this file.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

PROMETHEUS_BINARIES = ("prometheus", "prometheus-pushgateway", "promtool")
INSTALL = (
    "sudo apt-get install -y prometheus prometheus-pushgateway (./scripts/install_prometheus.sh)"
)


@pytest.fixture(scope="session")
def prometheus_binaries() -> dict[str, str]:
    """Paths of the Prometheus binaries; fails in CI and skips elsewhere when one is missing."""
    found = {name: shutil.which(name) for name in PROMETHEUS_BINARIES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        message = f"missing {', '.join(missing)}: install with {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Prometheus integration tests; {message}")
        pytest.skip(message)
    return {name: str(path) for name, path in found.items()}
