"""Exports on an object store (``s3://bucket/exports``, any fsspec URL): publish, list, fetch.

An object store has no rename and no directories, so the local protocol (a hidden temp
directory renamed into place) becomes an upload order: every file of a version first, its
``manifest.json`` last. The manifest is the commit marker: a version without one (an upload
that failed or is still running) is never listed, loaded or pointed at, and a single S3 object
appears whole or not at all, so a reader sees no manifest or a complete one.

Loading downloads a version into a private local cache directory, hashing every file while
it streams in (a size other than the manifest's is refused before a byte is read), and then
runs the very checks a local export gets (``ExportStore.load``: regular files, sizes, sha256,
the safetensors header before any tensor). Nothing from the store is unpickled.

Endpoint and credentials come from the client's standard settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles, instance
roles) or an fsspec filesystem passed in; docs/serving.md, "Exports on an object store (S3)".
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import fsspec

from lightning_fragrance.serving.loading import (
    CURRENT_FILE,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    SEQ_DIGITS,
    ChecksumMismatchError,
    ExportError,
    ExportManifest,
    ExportNotFoundError,
    ExportStore,
    FileEntry,
    IncompleteExportError,
    InvalidVersionNameError,
    LoadedModel,
    ManifestInvalidError,
    UnsafeExportFileError,
    entry_path,
    sha256_file,
    validate_version_name,
    version_name,
    version_sequence,
)

log = logging.getLogger(__name__)

# A pointer holds one version name; anything longer is not one (and is not read whole).
MAX_POINTER_BYTES = 4096
# Versions downloaded into the cache that stay there (the serving one and the one before it,
# for a rollback without a download); older ones are deleted after each fetch.
CACHED_VERSIONS = 2
# Where lf-export claims version numbers (``claim_version``); not a version (a dot name).
CLAIMS_DIR = ".claims"
_CHUNK = 1 << 20


def read_pointer(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The version a ``CURRENT`` object names, or ``None`` (missing, too large, not a name).

    One ranged GET per read (a poller runs it every interval on every replica). The client's
    listing cache is dropped first: s3fs answers from a cached listing of the parent, which
    would hide a new ``CURRENT`` from a poller forever.
    """
    try:
        fs.invalidate_cache(path)
        raw = bytes(fs.cat_file(path, start=0, end=MAX_POINTER_BYTES + 1))
        if len(raw) > MAX_POINTER_BYTES:
            return None
        return validate_version_name(raw.decode("utf-8").strip())
    except (OSError, ValueError):
        return None  # FileNotFoundError, UnicodeDecodeError, InvalidVersionNameError included


def write_pointer(fs: fsspec.AbstractFileSystem, path: str, version: str) -> None:
    """Upload ``version`` as the whole ``CURRENT`` object (one PUT replaces it atomically)."""
    fs.pipe_file(path, (validate_version_name(version) + "\n").encode())


class ObjectStoreExports(ExportStore):
    """An export store behind an fsspec URL, loaded through a private local cache.

    ``ExportStore("s3://bucket/exports")`` returns one of these. ``root`` is the local cache
    (where ``path_for`` points and the local checks run); ``location`` is the store's URL.

    Args:
        root: the store's URL (or, with ``fs``, its path on that filesystem).
        verify_checksums: hash every file while downloading and again on load (default True).
        fs: a filesystem to use instead of the one fsspec infers from the URL (explicit
            ``storage_options``: endpoint, credentials, retries).
        cache_dir: where versions are downloaded (default: a new private temporary directory,
            mode 0700, removed when the store is garbage-collected or the process exits).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        verify_checksums: bool = True,
        fs: fsspec.AbstractFileSystem | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        url = str(root)
        if fs is None:
            fs, url = fsspec.core.url_to_fs(url)
        self.fs: fsspec.AbstractFileSystem = fs
        self.remote_root = url.rstrip("/")
        if cache_dir is None:
            cache = Path(tempfile.mkdtemp(prefix="lf-export-cache-"))
            weakref.finalize(self, shutil.rmtree, cache, True)
        else:
            cache = Path(cache_dir)
            cache.mkdir(parents=True, exist_ok=True)
        super().__init__(cache, verify_checksums=verify_checksums)
        self.location = str(self.fs.unstrip_protocol(self.remote_root))
        self._fetched: list[str] = []

    @property
    def current_path(self) -> str:
        """``CURRENT``'s path on ``fs``."""
        return f"{self.remote_root}/{CURRENT_FILE}"

    def _remote(self, version: str, name: str = "") -> str:
        base = f"{self.remote_root}/{validate_version_name(version)}"
        return f"{base}/{name}" if name else base

    # ------------------------------------------------------------------ listing

    def versions(self) -> list[str]:
        """Every version prefix in the store (complete or not), in name order."""
        self.fs.invalidate_cache(self.remote_root)
        try:
            entries = self.fs.ls(self.remote_root, detail=True)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "directory" and _is_version_name(name):
                names.append(name)
        return sorted(names)

    def has_version(self, version: str) -> bool:
        """Whether ``version`` is complete in the store (its manifest was uploaded)."""
        with contextlib.suppress(ExportNotFoundError, IncompleteExportError):
            self._manifest_bytes(version)
            return True
        return False

    def read_manifest(self, version: str) -> ExportManifest:
        """Parse ``version``'s manifest from the store (at most 1 MiB)."""
        return _parse_manifest(self._remote(version, MANIFEST_FILE), self._manifest_bytes(version))

    def _manifest_bytes(self, version: str) -> bytes:
        path = self._remote(version, MANIFEST_FILE)
        try:
            size = _object_size(self.fs, path)
        except FileNotFoundError:
            if self.fs.exists(self._remote(version)):
                raise IncompleteExportError(
                    f"export {version!r} in {self.location} has no {MANIFEST_FILE}: its upload "
                    "failed or is still running. Re-export it with lf-export."
                ) from None
            raise ExportNotFoundError(
                f"export {version!r} not found in {self.location}; available: {self.versions()}"
            ) from None
        if size > MAX_MANIFEST_BYTES:
            raise ManifestInvalidError(
                f"{self.fs.unstrip_protocol(path)} has {size} bytes, over the limit of "
                f"{MAX_MANIFEST_BYTES}; it is not a file lf-export wrote. Re-export it."
            )
        return bytes(self.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES))

    # ------------------------------------------------------------------ CURRENT

    def current(self) -> str | None:
        """The version ``CURRENT`` names in the store."""
        return read_pointer(self.fs, self.current_path)

    def set_current(self, version: str) -> None:
        """Point the store's ``CURRENT`` at ``version``, which must be complete there."""
        if not self.has_version(version):
            raise ExportNotFoundError(
                f"export {version!r} is not complete in {self.location} (no manifest); "
                f"complete versions: {self.complete_versions()}"
            )
        write_pointer(self.fs, self.current_path, version)

    # ------------------------------------------------------------------ loading

    def load(self, version: str) -> LoadedModel:
        """Download ``version`` into the cache (hash-checked), then load it like a local one."""
        self.fetch(version)
        return super().load(version)

    def fetch(self, version: str) -> Path:
        """Download ``version`` into the private cache and return its local directory.

        Every file's size is checked against the manifest before it is read and its sha256
        while it streams in; a mismatch leaves nothing in the cache. A version already in
        the cache under the same manifest is not downloaded again (``load`` re-hashes it).

        Raises:
            ModelLoadError: a subclass naming what is wrong (missing, size, checksum, name).
        """
        raw = self._manifest_bytes(version)
        manifest = _parse_manifest(self._remote(version, MANIFEST_FILE), raw)
        target = self.path_for(version)
        cached = target / MANIFEST_FILE
        if not (cached.is_file() and cached.read_bytes() == raw):
            self._download(version, manifest, raw, target)
        self._remember(version)
        return target

    def _download(self, version: str, manifest: ExportManifest, raw: bytes, target: Path) -> None:
        staging = self.root / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir(mode=0o700)
        try:
            for name, entry in manifest.files.items():
                local = entry_path(staging, name)  # a plain file name, or refused
                self._download_file(self._remote(version, name), local, entry)
            (staging / MANIFEST_FILE).write_bytes(raw)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _download_file(self, path: str, local: Path, entry: FileEntry) -> None:
        url = self.fs.unstrip_protocol(path)
        try:
            size = _object_size(self.fs, path)
        except FileNotFoundError:
            raise IncompleteExportError(f"{url} is missing from the export") from None
        if size != entry.bytes:
            raise ChecksumMismatchError(
                f"{url} has {size} bytes, the manifest declares {entry.bytes}; the object "
                "changed after export. Re-export it."
            )
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as src, local.open("xb") as out:
            left = entry.bytes
            while left > 0 and (block := src.read(min(_CHUNK, left))):
                digest.update(block)
                out.write(block)
                left -= len(block)
        if left:
            raise ChecksumMismatchError(f"{url} ended {left} bytes short of the manifest's size")
        if self.verify_checksums and digest.hexdigest() != entry.sha256:
            raise ChecksumMismatchError(
                f"{url}: sha256 {digest.hexdigest()[:12]}... differs from the manifest's "
                f"{entry.sha256[:12]}...; the object changed after export. Re-export it."
            )

    def _remember(self, version: str) -> None:
        if version in self._fetched:
            self._fetched.remove(version)
        self._fetched.append(version)
        for old in self._fetched[:-CACHED_VERSIONS]:
            shutil.rmtree(self.root / old, ignore_errors=True)
        del self._fetched[:-CACHED_VERSIONS]


def _is_version_name(name: str) -> bool:
    try:
        validate_version_name(name)
    except InvalidVersionNameError:
        return False
    return True


def _object_size(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """The size of the object at ``path``; refused unless it is a plain object (a "file")."""
    fs.invalidate_cache(path)
    info = fs.info(path)
    if info.get("type") != "file":
        raise UnsafeExportFileError(
            f"{fs.unstrip_protocol(path)} is not an object (type {info.get('type')!r}); "
            "exports hold plain files only. Re-export it."
        )
    return int(info.get("size") or 0)


def _parse_manifest(path: str, raw: bytes) -> ExportManifest:
    try:
        return ExportManifest.model_validate_json(raw)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ManifestInvalidError(f"{path} is not a valid manifest: {exc}") from exc


# --------------------------------------------------------------------------- publishing


def claim_version(fs: fsspec.AbstractFileSystem, root: str, step: int) -> str:
    """Reserve the next free version number in the store and return the version's name.

    An object store has no rename to settle a race between two exporters, so each number is
    claimed by creating ``.claims/<number>`` with an exclusive create (S3's conditional write,
    ``If-None-Match: *``): of two exporters that listed the same store at the same moment, one
    gets the number and the other the next one. A claimed number is never reused, even when
    its upload then failed. (A store that ignores conditional writes gives no such guarantee:
    run one exporter at a time there.)

    Raises:
        ExportError: no free number among the next 100 (the store is not one lf-export wrote).
    """
    sequence = _highest_sequence(fs, root)
    claims = f"{root}/{CLAIMS_DIR}"
    for _ in range(100):
        sequence += 1
        try:
            fs.pipe_file(f"{claims}/{sequence:0{SEQ_DIGITS}d}", b"", mode="create")
        except FileExistsError:  # another exporter took it since we listed
            log.info("version number %d in %s was just taken; trying the next", sequence, root)
            continue
        return version_name(sequence, step)
    raise ExportError(f"no free version number in {fs.unstrip_protocol(root)} after {sequence}")


def _highest_sequence(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """The highest number of a version (complete or not) or a claim in the store; 0 if none."""
    numbers = [0]
    for folder, number in ((root, version_sequence), (f"{root}/{CLAIMS_DIR}", _claim_number)):
        fs.invalidate_cache(folder)
        if fs.exists(folder):
            names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
            numbers += [number(name) for name in names]
    return max(numbers)


def _claim_number(name: str) -> int:
    return int(name) if name.isdigit() else 0


def publish_export(
    staging: Path,
    url: str,
    step: int,
    files: Mapping[str, FileEntry],
    source: str,
    metrics: Mapping[str, float],
    *,
    make_current: bool = False,
    fs: fsspec.AbstractFileSystem | None = None,
) -> str:
    """Upload the finished export in ``staging`` to the store at ``url``; return its URL.

    Order: claim a version number (``claim_version``), the files, then ``manifest.json`` (the
    commit marker), then ``CURRENT`` if asked. An upload that fails removes what it uploaded
    when the store is still reachable; what it cannot remove has no manifest, so it is never
    listed or loaded.

    Raises:
        ExportError: the upload failed (the cause is chained); no version was published.
    """
    if fs is None:
        fs, root = fsspec.core.url_to_fs(url)
    else:
        root = url
    root = root.rstrip("/")
    version, prefix = "(unclaimed)", ""
    try:
        version = claim_version(fs, root, step)
        prefix = f"{root}/{version}"
        manifest = ExportManifest(
            version=version,
            files=dict(files),
            source_checkpoint=source,
            source_step=step,
            metrics={k: float(v) for k, v in metrics.items()},
            created_at=datetime.now(timezone.utc).isoformat(),
        )
        for name in files:
            fs.put_file(str(staging / name), f"{prefix}/{name}")
        fs.pipe_file(f"{prefix}/{MANIFEST_FILE}", manifest.model_dump_json(indent=2).encode())
    except BaseException as exc:
        if prefix:
            with contextlib.suppress(Exception):
                fs.rm(prefix, recursive=True)
        if not isinstance(exc, Exception) or isinstance(exc, ExportError):
            raise  # KeyboardInterrupt, SystemExit: cleaned up, not reworded
        raise ExportError(
            f"uploading {version} to {fs.unstrip_protocol(root)} failed ({type(exc).__name__}: "
            f"{exc}); no version was published (without its manifest it is never listed). "
            "Check the endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) "
            "and export again."
        ) from exc
    if make_current:
        write_pointer(fs, f"{root}/{CURRENT_FILE}", version)
    return str(fs.unstrip_protocol(prefix))


def publish_export_directory(
    directory: str | Path,
    url: str,
    *,
    make_current: bool = False,
    fs: fsspec.AbstractFileSystem | None = None,
) -> str:
    """Upload a finished local export (any model line's) to the store as its next version.

    Every file is hashed against the local manifest first, so what is uploaded is what was
    exported; the step, source and metrics are kept. Returns the new version's URL.

    Raises:
        ModelLoadError: the local export is incomplete or a file differs from its manifest.
        ExportError: the upload failed (no version was published).
    """
    source = Path(directory)
    manifest = ExportStore(source.parent).read_manifest(source.name)
    for name, entry in manifest.files.items():
        local = entry_path(source, name)
        if not local.is_file():
            raise IncompleteExportError(f"{local} is missing from the export; re-export it")
        if sha256_file(local) != entry.sha256 or local.stat().st_size != entry.bytes:
            raise ChecksumMismatchError(
                f"{local} differs from {source / MANIFEST_FILE}; re-export it before uploading"
            )
    return publish_export(
        source,
        url,
        manifest.source_step,
        manifest.files,
        manifest.source_checkpoint,
        manifest.metrics,
        make_current=make_current,
        fs=fs,
    )
