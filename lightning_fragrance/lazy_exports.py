"""PEP 562 lazy exports for package ``__init__`` modules.

`lightning_fragrance.rl` keeps Lightning out of the serving processes (importing it cost each
one 9-20 s at start), and `lightning_fragrance.monitoring` keeps prometheus_client from being
imported before ``PROMETHEUS_MULTIPROC_DIR`` is set: both export some names only on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, table: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose ``table`` names (name -> module)
    are imported on first access and then cached in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
