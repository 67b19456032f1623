"""Exports on an fsspec URL: publish (files first, manifest last), list, fetch, verify, load.

These run on fsspec's in-memory filesystem (``memory://``), a real fsspec filesystem with the
object-store shape (no rename, prefixes instead of directories); the same code against a real
S3-protocol server is tests/integration/serving/test_s3_replicas.py.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from lightning_fragrance.serving.current_sync import CurrentSync, FsspecPointer
from lightning_fragrance.serving.hot_reload import HotReloadManager
from lightning_fragrance.serving.loading import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ChecksumMismatchError,
    ExportError,
    ExportNotFoundError,
    ExportStore,
    IncompleteExportError,
    LoadedModel,
    UnsafeExportFileError,
    export,
)
from lightning_fragrance.serving.object_store import (
    CACHED_VERSIONS,
    CLAIMS_DIR,
    ObjectStoreExports,
)
from lightning_fragrance.serving.settings import ServeSettings


@pytest.fixture
def url() -> str:
    return f"memory://lf-{uuid.uuid4().hex[:12]}/exports"


def _version(published: Path | str) -> str:
    return str(published).rstrip("/").rsplit("/", 1)[-1]


def _flip_one_byte(fs: fsspec.AbstractFileSystem, path: str) -> None:
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF  # same size: only the sha256 can tell
    fs.pipe_file(path, bytes(data))


def test_a_url_store_is_the_object_store_variant_and_loads_what_a_local_export_loads(
    tmp_path: Path, url: str, ppo_checkpoints: list[Path]
) -> None:
    published = export(ppo_checkpoints[1], url, make_current=True)
    local = export(ppo_checkpoints[1], tmp_path / "exports")
    store = ExportStore(url)
    assert isinstance(store, ObjectStoreExports)
    version = _version(published)
    # memory:// spells its root "memory:///<name>": compare the paths below the scheme.
    assert str(published).endswith(url.split("://")[1] + "/" + version)
    assert store.complete_versions() == [version] and store.current() == version
    loaded = store.load(version)
    reference = ExportStore(tmp_path / "exports").load(local.name)
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.manifest.files == reference.manifest.files
    # What was loaded came through the private cache, never from the store directly.
    assert (store.root / version / WEIGHTS_FILE).is_file()
    assert store.location.endswith(url.split("://")[1])


def test_versions_are_numbered_after_every_prefix_including_a_partial_upload(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    first = _version(export(ppo_checkpoints[0], url))
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/000002-step9/{WEIGHTS_FILE}", b"half an upload")
    second = _version(export(ppo_checkpoints[1], url))
    assert first.startswith("000001-") and second.startswith("000003-")


def test_a_version_without_its_manifest_is_never_listed_loaded_or_pointed_at(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    good = _version(export(ppo_checkpoints[0], url, make_current=True))
    fs, root = fsspec.core.url_to_fs(url)
    partial = "000002-step2"
    for name in (WEIGHTS_FILE, CONFIG_FILE):  # what an exporter that died before the manifest left
        fs.pipe_file(f"{root}/{partial}/{name}", fs.cat_file(f"{root}/{good}/{name}"))
    store = ExportStore(url)
    assert store.versions() == [good, partial]
    assert store.complete_versions() == [good] and store.newest() == good
    assert not store.has_version(partial)
    with pytest.raises(IncompleteExportError, match=r"no manifest\.json"):
        store.load(partial)
    with pytest.raises(ExportNotFoundError, match="not complete"):
        store.set_current(partial)
    with pytest.raises(ExportNotFoundError, match="not found"):
        store.load("000009-step9")
    assert store.current() == good


def test_a_changed_object_is_refused_and_nothing_of_it_stays_in_the_cache(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    version = _version(export(ppo_checkpoints[0], url))
    fs, root = fsspec.core.url_to_fs(url)
    _flip_one_byte(fs, f"{root}/{version}/{WEIGHTS_FILE}")
    store = ExportStore(url)
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        store.load(version)
    assert [p.name for p in store.root.iterdir()] == []


def test_an_object_of_another_size_is_refused_before_it_is_downloaded(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    version = _version(export(ppo_checkpoints[0], url))
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/{version}/{WEIGHTS_FILE}", b"\0" * 10_000_000)
    with pytest.raises(ChecksumMismatchError, match="10000000 bytes, the manifest declares"):
        ExportStore(url).load(version)


def test_a_manifest_entry_that_names_a_path_is_refused(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    version = _version(export(ppo_checkpoints[0], url))
    fs, root = fsspec.core.url_to_fs(url)
    manifest_path = f"{root}/{version}/{MANIFEST_FILE}"
    forged = fs.cat_file(manifest_path).replace(b'"config.json"', b'"../config.json"')
    fs.pipe_file(manifest_path, forged)
    with pytest.raises(UnsafeExportFileError, match="plain file name"):
        ExportStore(url).load(version)


def test_the_cache_keeps_the_last_versions_loaded_and_reuses_an_unchanged_one(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    names = [_version(export(ppo_checkpoints[i % 2], url)) for i in range(3)]
    store = ExportStore(url)
    assert isinstance(store, ObjectStoreExports)
    for name in names:
        store.load(name)
    assert sorted(p.name for p in store.root.iterdir()) == names[-CACHED_VERSIONS:]
    cached = store.root / names[-1] / WEIGHTS_FILE
    inode = cached.stat().st_ino
    store.load(names[-1])
    assert cached.stat().st_ino == inode  # same manifest: not downloaded again (re-hashed)


def test_a_failed_upload_publishes_nothing(
    tmp_path: Path, url: str, ppo_checkpoints: list[Path]
) -> None:
    # A store the exporter cannot write to: a file where the store's prefix should be.
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(root, b"not a store")
    with pytest.raises((ExportError, OSError)):
        export(ppo_checkpoints[0], url + "/inner", make_current=True)
    assert ExportStore(url + "/inner").complete_versions() == []


def test_a_line_on_a_url_store_follows_the_stores_current_object_by_polling(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    first = _version(export(ppo_checkpoints[0], url, make_current=True))
    second = _version(export(ppo_checkpoints[1], url))
    store = ExportStore(url)
    manager: HotReloadManager[LoadedModel] = HotReloadManager(store.load, warmup_steps=0)
    sync = CurrentSync(store, manager)
    assert isinstance(sync.pointer, FsspecPointer)
    assert sync.pointer.location.endswith(url.split("://")[1] + "/CURRENT")
    assert sync.start().version == first

    async def follow() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(sync.watch(stop, 0.05))  # no file events: it polls
        store.set_current(second)
        for _ in range(1500):
            if manager.current_version == second:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(follow())
    assert manager.current_version == second
    manager.shutdown()


def test_serve_settings_keep_a_store_url_whole() -> None:
    settings = ServeSettings(export_dir="s3://bucket/exports")
    assert settings.export_dir == "s3://bucket/exports"
    assert settings.policy_store_dir() == "s3://bucket/exports"
    assert settings.brief_llm_store_dir() == "s3://bucket/exports/brief_llm"
    again = ServeSettings.model_validate_json(settings.model_dump_json())  # uvicorn workers
    assert again.export_dir == "s3://bucket/exports"
    assert ServeSettings(export_dir="exports").export_dir == Path("exports")


def test_a_line_on_a_url_store_falls_back_when_current_names_a_changed_version(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    good = _version(export(ppo_checkpoints[0], url))
    bad = _version(export(ppo_checkpoints[1], url, make_current=True))
    fs, root = fsspec.core.url_to_fs(url)
    _flip_one_byte(fs, f"{root}/{bad}/{WEIGHTS_FILE}")
    store = ExportStore(url)
    manager: HotReloadManager[LoadedModel] = HotReloadManager(store.load, warmup_steps=0)
    sync = CurrentSync(store, manager)
    assert sync.start().version == good
    assert sync.fallback is not None and sync.fallback.wanted == bad
    assert "ChecksumMismatchError" in sync.fallback.reason
    assert store.current() == bad  # left as it is: the operator decides
    manager.shutdown()


def test_auto_promotion_on_a_url_store_points_current_at_a_new_export_once_it_loaded(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    first = _version(export(ppo_checkpoints[0], url, make_current=True))
    store = ExportStore(url)
    manager: HotReloadManager[LoadedModel] = HotReloadManager(store.load, warmup_steps=0)
    sync = CurrentSync(store, manager, auto_promote=True)
    assert sync.start().version == first
    second = _version(export(ppo_checkpoints[1], url))
    record = sync.reconcile()
    assert record is not None and record.done.wait(60)
    assert manager.current_version == second and store.current() == second
    manager.shutdown()


def test_a_claimed_version_number_is_never_reused_even_when_its_upload_left_nothing(
    url: str, ppo_checkpoints: list[Path]
) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/{CLAIMS_DIR}/000001", b"")  # an exporter that claimed 1 and failed
    published = _version(export(ppo_checkpoints[0], url))
    assert published.startswith("000002-")
    assert ExportStore(url).versions() == [published]  # the claims are not a version
