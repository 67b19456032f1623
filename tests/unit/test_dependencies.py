"""Dependency floors that a security or correctness promise rests on."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def _requirement(name: str) -> Requirement:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found = [Requirement(line) for line in project["dependencies"]]
    return next(req for req in found if req.name == name)


def test_torch_before_2_6_is_refused_because_weights_only_loading_was_unsafe() -> None:
    # CVE-2025-32434: torch.load(weights_only=True) could run code from a crafted file < 2.6.
    torch = _requirement("torch")
    assert not torch.specifier.contains("2.5.1")
    assert torch.specifier.contains("2.6.0")
