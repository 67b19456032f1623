"""Filesystems that fail or stall on demand, for the writer and store tests.

They subclass fsspec's in-memory filesystem: a real fsspec implementation with injected
behaviour, because a full disk or a stalled NFS mount cannot be produced reliably here.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem


class _GuardedFile:
    def __init__(self, inner: Any, fs: ControlledFileSystem) -> None:
        self._inner = inner
        self._fs = fs

    def write(self, data: Any) -> int:
        self._fs.gate.wait()
        if self._fs.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(self._inner.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> _GuardedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)


class ControlledFileSystem(MemoryFileSystem):
    """In-memory fsspec filesystem whose checkpoint writes can fail (ENOSPC) or wait on a gate."""

    cachable = False  # a fresh instance per test, never fsspec's cached one
    protocol = ("controlled",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = {}
        self.pseudo_dirs = [""]
        self.disk_full = False
        self.gate = threading.Event()
        self.gate.set()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        handle = super()._open(path, mode, **kwargs)
        if "w" in mode and path.endswith(".ckpt.tmp"):
            return _GuardedFile(handle, self)
        return handle


@pytest.fixture
def controlled_fs() -> ControlledFileSystem:
    return ControlledFileSystem()
