"""An fsspec filesystem that can fill up, hold writes and reads at a gate, and log operations.

A real disk cannot be told "be full now" or "pause this write here" from a test, so this is the
one place where the checkpoint tests use a stand-in: fsspec's own in-memory filesystem, subclassed
(fsspec documents subclassing and `register_implementation` for exactly this). The store reaches
it the same way it reaches S3 or GCS, through the fsspec interface, so nothing in the engine is
mocked.
"""

from __future__ import annotations

import errno
import json
import threading
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

PROTOCOL = "faultymem"
GATE_TIMEOUT_S = 60.0


class FaultyFile(MemoryFile):
    """A file of `FaultyMemoryFileSystem`: checks capacity on write, waits at the write gate on
    close, and logs the history's content when a history file is closed."""

    fs: FaultyMemoryFileSystem

    def write(self, data: Any) -> int:
        nbytes = memoryview(data).nbytes
        fs = self.fs
        if fs.capacity is not None and fs.used_bytes() + nbytes > fs.capacity:
            fs.log("enospc", self.path)
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        return super().write(data)

    def close(self) -> None:
        fs = self.fs
        if self.path.endswith(".ckpt.tmp") and fs.write_gate is not None:
            fs.write_waiting.set()
            if not fs.write_gate.wait(GATE_TIMEOUT_S):
                raise TimeoutError(f"write gate of {self.path} never opened")
        if self.path.endswith("checkpoint_history.json.tmp"):
            steps = [e["step"] for e in json.loads(self.getvalue() or b"{}").get("entries", [])]
            fs.log("history", self.path, steps)
        else:
            fs.log("closed", self.path)
        super().close()


class FaultyMemoryFileSystem(MemoryFileSystem):
    """In-memory filesystem with a capacity, a write gate, a read gate and an operation log.

    Attributes:
        capacity: Total bytes the "disk" holds; a write beyond raises ENOSPC (None: unlimited).
        write_gate: When set to an unset `threading.Event`, closing a `*.ckpt.tmp` file waits
            for it (the write is "in flight"); `write_waiting` tells that a writer is waiting.
        read_gate: Same for reading a `*.ckpt` file with `cat_file`; `read_waiting` tells it.
        ops: `(operation, path, detail)` in the order they happened.
    """

    protocol = PROTOCOL
    # Our own namespace, not MemoryFileSystem's process-wide one.
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reset()

    def reset(self) -> None:
        """Empty the store and clear every fault (fsspec caches instances: `faultymem://` URLs
        and `FaultyMemoryFileSystem()` reach this same object)."""
        self.store.clear()
        self.pseudo_dirs[:] = [""]
        self.capacity: int | None = None
        self.write_gate: threading.Event | None = None
        self.write_waiting = threading.Event()
        self.read_gate: threading.Event | None = None
        self.read_waiting = threading.Event()
        self.ops: list[tuple[str, str, Any]] = []
        self._ops_lock = threading.Lock()

    def log(self, operation: str, path: str, detail: Any = None) -> None:
        with self._ops_lock:
            self.ops.append((operation, path, detail))

    def used_bytes(self) -> int:
        return sum(f.size for f in tuple(self.store.values()))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if mode in {"wb", "w+b", "xb", "x+b"}:
            path = self._strip_protocol(path)
            file = FaultyFile(self, path, kwargs.get("data"))
            file.commit()
            self.log("open", path)
            return file
        return super()._open(path, mode, **kwargs)

    def cat_file(self, path: str, start: Any = None, end: Any = None, **kwargs: Any) -> bytes:
        if str(path).endswith(".ckpt") and self.read_gate is not None:
            self.read_waiting.set()
            if not self.read_gate.wait(GATE_TIMEOUT_S):
                raise TimeoutError(f"read gate of {path} never opened")
        return bytes(super().cat_file(path, start, end, **kwargs))

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        super().mv(path1, path2, **kwargs)
        self.log("mv", self._strip_protocol(path2), self._strip_protocol(path1))

    def _rm(self, path: str) -> None:
        super()._rm(path)
        self.log("rm", self._strip_protocol(path))


def new_faulty_filesystem() -> FaultyMemoryFileSystem:
    """The (cached) instance, emptied and without faults; ``faultymem://`` URLs reach it."""
    fsspec.register_implementation(PROTOCOL, FaultyMemoryFileSystem, clobber=True)
    fs = FaultyMemoryFileSystem()
    fs.reset()
    return fs
