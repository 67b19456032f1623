"""HashingWriter: the digest and size are those of the bytes that reached the file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lightning_fragrance.checkpointing import hashing_writer
from lightning_fragrance.checkpointing.hashing_writer import HashingWriter


@pytest.fixture(autouse=True)
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunk and writeback sizes so a few MB exercise every path (chunking, background
    # hashing, several writebacks).
    monkeypatch.setattr(hashing_writer, "CHUNK_BYTES", 256 * 1024)
    monkeypatch.setattr(hashing_writer, "WRITEBACK_BYTES", 512 * 1024)
    monkeypatch.setattr(hashing_writer, "SMALL_WRITE", 64 * 1024)


def test_digest_matches_file_for_mixed_small_and_large_writes(tmp_path: Path) -> None:
    parts = [os.urandom(n) for n in (10, 3 * 1024 * 1024 + 7, 100, 700 * 1024, 1)]
    path = tmp_path / "blob"
    with path.open("wb") as handle:
        writer = HashingWriter(handle, handle.fileno())
        for part in parts:
            assert writer.write(memoryview(part)) == len(part)
        writer.close()
    data = path.read_bytes()
    assert data == b"".join(parts)
    assert writer.hexdigest() == hashlib.sha256(data).hexdigest()
    assert writer.nbytes == len(data)


def test_writes_without_a_descriptor_skip_writeback(tmp_path: Path) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    with (tmp_path / "blob").open("wb") as handle:
        writer = HashingWriter(handle)
        writer.write(payload)
        writer.close()
    assert writer.hexdigest() == hashlib.sha256(payload).hexdigest()
