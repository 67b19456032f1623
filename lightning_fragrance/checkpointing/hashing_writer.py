"""`HashingWriter`: one pass from serialiser to disk, with sha256 and writeback overlapped.

`torch.save` hands over large buffers (one per tensor storage). For each one the writer hashes
on a helper thread while it writes the same bytes to the file (hashlib and file writes both
release the GIL), and every `WRITEBACK_BYTES` it starts an `fdatasync` in the background so the
disk works while the serialiser produces the rest. Without that the kernel keeps the whole
checkpoint dirty in the page cache (the background writeback threshold is ~10 % of RAM) and the
final fsync writes it all at once, after the CPU work: serial instead of overlapped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO

CHUNK_BYTES = 16 * 1024 * 1024
WRITEBACK_BYTES = 64 * 1024 * 1024
SMALL_WRITE = 1024 * 1024
"""Writes below this are hashed inline: a thread hand-off costs more than it saves."""


class HashingWriter:
    """File-like object (``write``/``flush``) that hashes and counts the bytes it forwards.

    Args:
        target: Binary file to write to.
        fileno: Its descriptor for early writeback (local files), or None.
    """

    def __init__(self, target: IO[bytes], fileno: int | None = None) -> None:
        self._target = target
        self._fileno = fileno
        self.sha256 = hashlib.sha256()
        self.nbytes = 0
        self._since_writeback = 0
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lf-hash-write")
        self._writeback: Future[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        if size < SMALL_WRITE:
            self.sha256.update(view)
            self._target.write(view)
        else:
            # The buffer may be reused by the caller once write() returns: wait for the hash.
            hashing = self._submit(self.sha256.update, view)
            for start in range(0, size, CHUNK_BYTES):
                self._target.write(view[start : start + CHUNK_BYTES])
                self._since_writeback += min(CHUNK_BYTES, size - start)
                self._maybe_start_writeback()
            hashing.result()
        self.nbytes += size
        return size

    def _maybe_start_writeback(self) -> None:
        if self._fileno is None or self._since_writeback < WRITEBACK_BYTES:
            return
        if self._writeback is not None and not self._writeback.done():
            return
        if self._writeback is not None:
            self._writeback.result()  # surface an I/O error of the previous writeback
        self._target.flush()  # hand the buffered bytes to the kernel first
        self._since_writeback = 0
        self._writeback = self._submit(os.fdatasync, self._fileno)

    def _submit(self, fn: Callable[..., None], *args: object) -> Future[None]:
        """Run ``fn`` on the helper pool, or inline once the interpreter is shutting down:
        `concurrent.futures` refuses new work then, and a save flushed at exit (the guide's
        loop never calls close()) must still complete."""
        try:
            return self._pool.submit(fn, *args)
        except RuntimeError:
            done: Future[None] = Future()
            fn(*args)
            done.set_result(None)
            return done

    def flush(self) -> None:
        self._target.flush()

    def close(self) -> None:
        """Wait for background work (the caller still fsyncs the file); idempotent."""
        if self._writeback is not None:
            self._writeback.result()
            self._writeback = None
        self._pool.shutdown(wait=True)

    def hexdigest(self) -> str:
        """The sha256 of everything written so far."""
        return self.sha256.hexdigest()
