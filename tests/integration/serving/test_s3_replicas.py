"""Two `lf-serve` replicas on one export store on S3 converge on its `CURRENT` by polling.

moto stands in for S3: `moto_s3.moto_server` runs it in server mode, a real S3-protocol HTTP
server on 127.0.0.1, and everything under test reaches it as it would reach S3 (fsspec + s3fs,
the endpoint and credentials from the standard `AWS_*` environment variables): two real
`lf-serve` processes started by the package's launcher, the real `lf-export` command, and a
second, uncached client that looks at the store as another machine would.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# The S3 server helper lives with the checkpoint store's object-store tests; one copy serves both.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpointing"))
from moto_s3 import (
    client_environment,
    new_bucket,
    observer_client,
    s3_session,
    severable_client,
)
from moto_s3 import require_moto as _require_moto
from serving_server import AUTH, REPO, TOKEN

from lightning_fragrance.examples.tiny_ppo import tiny_ppo_checkpoints
from lightning_fragrance.llm.export import copy_brief_export
from lightning_fragrance.llm.shipped import shipped_sft_dir
from lightning_fragrance.serving.launcher import ServeProcess, start_lf_serve
from lightning_fragrance.serving.loading import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ExportError,
    ExportStore,
    export,
)
from lightning_fragrance.serving.object_store import publish_export_directory

_require_moto()

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The replicas' poll interval (`reconcile_interval_s`). The production default is 2 s.
POLL_S = 0.5
BODY = {"user_text": "fresh citrus for summer", "mode": "fast"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_session() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    return new_bucket()


def _name(published: Path | str) -> str:
    return str(published).rstrip("/").rsplit("/", 1)[-1]


def _served_version(server: ServeProcess) -> str:
    response = httpx.post(f"{server.url}/dna/create", json=BODY, timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["X-Model-Version"]


def _lf_export(*args: str) -> str:
    """Run the real `lf-export` command (the environment carries the endpoint); its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "lightning_fragrance.cli.export", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def _finished(server: ServeProcess, reload_id: str) -> dict[str, Any] | None:
    url = f"{server.url}/admin/model/reload/{reload_id}"
    record: dict[str, Any] = httpx.get(url, headers=AUTH, timeout=10).json()
    return record if record["result"] is not None else None


def _follow_record(
    server: ServeProcess, version: str, since: int = 0, timeout: float = 120.0
) -> dict[str, Any]:
    """The finished reload this replica started on its own when CURRENT named ``version``
    (the first one logged after the log's first ``since`` characters).

    The replica logs the reload's id when its poll sees the new CURRENT; its record (start and
    end as wall-clock times of this machine, the phases) comes from the admin API.
    """
    pattern = re.compile(rf"CURRENT names {re.escape(version)}: reloading \(reload (\S+)\)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(server.log()[since:])
        if match and (record := _finished(server, match.group(1))) is not None:
            return record
        time.sleep(0.05)
    raise AssertionError(f"{server.url} did not finish a reload to {version}:\n{server.log()}")


def test_two_replicas_on_s3_converge_on_current_refuse_a_changed_object_and_skip_partial_uploads(
    tmp_path: Path, bucket: str, ppo_checkpoints: list[Path]
) -> None:
    url = f"s3://{bucket}/exports"
    v1 = _name(export(ppo_checkpoints[0], url, make_current=True))
    env = {**os.environ, **client_environment(os.environ["AWS_ENDPOINT_URL"])}
    replicas = [
        start_lf_serve(
            url,
            token=TOKEN,
            log_path=tmp_path / f"replica-{i}.log",
            cwd=REPO,
            env=env,
            warmup_steps=2,
            reconcile_interval_s=POLL_S,
        )
        for i in range(2)
    ]
    try:
        for replica in replicas:
            replica.wait_ready(timeout=180)
        assert [_served_version(r) for r in replicas] == [v1, v1]

        # v2 is uploaded by the real lf-export, then CURRENT is rewritten by the code that
        # `lf-export make_current=true` runs, here in the test so that the moment CURRENT
        # changed is known to the millisecond (a subprocess's exit would blur it).
        v2 = _name(_lf_export(f"ckpt_path={ppo_checkpoints[1]}", f"export_dir={url}"))
        store = ExportStore(url)
        changed_at = time.time()  # before the PUT: its own duration counts against the bound
        store.set_current(v2)
        records = [_follow_record(r, v2) for r in replicas]
        assert [_served_version(r) for r in replicas] == [v2, v2]
        for i, record in enumerate(records):
            assert record["result"] == "success", record
            noticed = record["started_at"] - changed_at
            reload_s = record["finished_at"] - record["started_at"]
            serving = record["finished_at"] - changed_at
            print(
                f"replica {i}: CURRENT -> {v2} noticed after {noticed:.3f} s (poll "
                f"{POLL_S} s), reload {reload_s:.3f} s {record['phase_seconds']}, "
                f"serving after {serving:.3f} s"
            )
            # The promise (docs/serving.md): a replica starts its reload within one poll
            # interval plus one read of CURRENT, and serves once its own reload finished.
            # 2 intervals leave the read (and a loaded machine's scheduling) a whole interval;
            # the reload's own time (download, verify, load, warm up, switch) is measured
            # by the replica and added, because it does not depend on the interval. Times are
            # this machine's wall clock in both processes; `finished_at` is after the old
            # worker drained (here well under a millisecond after the switch).
            assert serving <= 2 * POLL_S + reload_s, (i, noticed, reload_s)

        # A changed object on the store (same size, other bytes): refused, the old one serves.
        v3 = _name(export(ppo_checkpoints[0], url))
        client = observer_client()
        weights = f"{bucket}/exports/{v3}/{WEIGHTS_FILE}"
        data = bytearray(client.cat_file(weights))
        data[len(data) // 2] ^= 0xFF
        client.pipe_file(weights, bytes(data))
        store.set_current(v3)
        for replica in replicas:
            record = _follow_record(replica, v3)
            assert record["result"] == "validation_failed", record
            assert record["error"]["reason"] == "checksum_mismatch", record
        time.sleep(3 * POLL_S)  # and it is not retried in a loop: still the old version
        assert [_served_version(r) for r in replicas] == [v2, v2]
        for replica in replicas:
            assert replica.log().count(f"CURRENT names {v3}: reloading") == 1

        # An upload that never wrote its manifest (an exporter killed midway) is not a version.
        partial = "000004-step99"
        for name in (WEIGHTS_FILE, "config.json"):
            client.pipe_file(f"{bucket}/exports/{partial}/{name}", b"{}")
        for replica in replicas:
            info = httpx.get(f"{replica.url}/admin/model", headers=AUTH, timeout=10).json()
            assert info["versions"] == [v1, v2, v3], info["versions"]
            assert info["current_pointer"] == v3
        assert ExportStore(url).complete_versions() == [v1, v2, v3]

        # The operator's path end to end: lf-export make_current=true, both replicas follow.
        v5 = _name(
            _lf_export(f"ckpt_path={ppo_checkpoints[1]}", f"export_dir={url}", "make_current=true")
        )
        assert v5.startswith("000005-")  # the partial upload's number is never reused
        assert client.cat_file(f"{bucket}/exports/CURRENT").decode().strip() == v5
        for replica in replicas:
            assert _follow_record(replica, v5)["result"] == "success"
        assert [_served_version(r) for r in replicas] == [v5, v5]

        # An admin reload by name on one replica rewrites CURRENT on the store; the other follows.
        since = len(replicas[1].log())
        answer = httpx.post(
            f"{replicas[0].url}/admin/model/reload", json={"version": v2}, headers=AUTH, timeout=10
        )
        assert answer.status_code == 202, answer.text
        assert _follow_record(replicas[1], v2, since)["result"] == "success"
        assert client.cat_file(f"{bucket}/exports/CURRENT").decode().strip() == v2
        assert [_served_version(r) for r in replicas] == [v2, v2]
    finally:
        for replica in replicas:
            replica.stop()


def test_an_export_upload_cut_midway_publishes_no_version(bucket: str, tmp_path: Path) -> None:
    # A policy of ~0.3 MB, so the cut lands inside the weights' upload.
    checkpoint = tiny_ppo_checkpoints(tmp_path / "ckpts", steps=1, hidden=256)[-1]
    url = f"s3://{bucket}/exports"
    good = _name(export(checkpoint, url, make_current=True))
    staged = export(checkpoint, tmp_path / "local")  # what lf-export stages before uploading

    proxy, fs = severable_client()
    try:
        proxy.sever_after(64 * 1024)  # the upload loses the network after 64 KB
        with pytest.raises(ExportError, match="no version was published"):
            publish_export_directory(staged, f"{bucket}/exports", make_current=True, fs=fs)
    finally:
        proxy.close()

    store = ExportStore(url)
    assert store.complete_versions() == [good]
    assert store.current() == good
    uploaded = observer_client().find(f"{bucket}/exports")
    assert not any(path.endswith(MANIFEST_FILE) and good not in path for path in uploaded)


def test_the_brief_llm_line_serves_from_the_store_too(
    tmp_path: Path, bucket: str, ppo_checkpoints: list[Path]
) -> None:
    policy_url, brief_url = f"s3://{bucket}/exports", f"s3://{bucket}/exports/brief_llm"
    policy = _name(export(ppo_checkpoints[0], policy_url, make_current=True))
    # The trained brief model shipped in the package, exported locally, then uploaded.
    local = copy_brief_export(shipped_sft_dir(), tmp_path / "local")
    brief = _name(publish_export_directory(local, brief_url, make_current=True))
    server = start_lf_serve(
        policy_url,
        token=TOKEN,
        log_path=tmp_path / "serve.log",
        cwd=REPO,
        env={**os.environ},
        brief_backend="llm",
        llm_export_dir=brief_url,
        reconcile_interval_s=POLL_S,
    )
    try:
        server.wait_ready(timeout=180)
        response = httpx.post(f"{server.url}/dna/create", json=BODY, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == policy
        assert response.headers["X-Brief-Model-Version"] == brief
        info = httpx.get(f"{server.url}/admin/model", headers=AUTH, timeout=10).json()
        assert info["models"]["brief_llm"]["versions"] == [brief]
    finally:
        server.stop()


def test_exporters_racing_on_one_store_publish_distinct_versions_that_all_load(
    tmp_path: Path, bucket: str, ppo_checkpoints: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    # The exclusive create that claims a version number (S3's If-None-Match: *), on this server.
    client = observer_client()
    client.pipe_file(f"{bucket}/probe", b"", mode="create")
    with pytest.raises(FileExistsError):
        client.pipe_file(f"{bucket}/probe", b"", mode="create")

    url = f"s3://{bucket}/exports"
    staged = [export(ppo_checkpoints[i], tmp_path / "local") for i in range(2)]
    published: list[str] = []
    for _ in range(3):  # rounds of two exporters released at the same instant
        barrier = threading.Barrier(2)

        def publish(directory: Path, start: threading.Barrier = barrier) -> None:
            start.wait()
            published.append(_name(publish_export_directory(directory, url)))

        threads = [threading.Thread(target=publish, args=(d,)) for d in staged]
        with caplog.at_level(logging.INFO, logger="lightning_fragrance.serving.object_store"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
    collisions = sum("was just taken" in r.getMessage() for r in caplog.records)
    print(f"6 racing exports: {collisions} version number(s) taken by the other exporter")
    assert sorted(int(name[:6]) for name in published) == [1, 2, 3, 4, 5, 6]
    store = ExportStore(url)
    assert store.complete_versions() == sorted(published)
    for name in published:  # no upload was mixed into another's version
        assert store.load(name).manifest.version == name
