"""Lets the tests here import their shared modules (`crash_harness`, `faulty_filesystem`) by name
under any pytest import mode, including `--import-mode=importlib` and package-style test trees."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
