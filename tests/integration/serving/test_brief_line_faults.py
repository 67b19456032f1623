"""The brief LLM line's faults, each counted and shown like the policy line's (real uvicorn).

`lf-serve brief_backend=llm` runs as a subprocess on loopback over real Qwen2 exports (tiny,
random weights: serving does not care what they learnt). Three faults:

- a ``generate`` still running when its version's drain times out: answered 503 +
  Retry-After, counted in ``model_line_drain_timeout_requests_total{model="brief_llm"}`` and
  in ``GET /admin/model`` under the line;
- a load past ``llm_load_timeout_s``: the reload fails as ``load_failed``, the loader is
  abandoned and counted (``model_line_reload_abandoned_loads_total{model="brief_llm"}``);
- a brief ``CURRENT`` naming a corrupt or missing export at startup: the newest valid export
  serves, ``/ready`` and ``GET /admin/model`` report the line degraded, and
  ``model_line_info{model="brief_llm",role="fallback"}`` is 1.

The policy's unlabelled ``model_*`` metrics must not move in any of them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_server import AUTH, ServerProcess

from lightning_fragrance.llm.export import export_brief_model
from lightning_fragrance.llm.model import build_model
from lightning_fragrance.llm.tokenizer import train_tokenizer
from lightning_fragrance.serving.loading import MANIFEST_FILE, export, read_current
from lightning_fragrance.serving.random_brief_model import TINY_SIZE, export_random_brief_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BODY = {"user_text": "a fresh citrus scent for summer, not too sweet", "mode": "fast"}
# Positions for answers of thousands of tokens (rotary embeddings; nothing else grows).
ENDLESS_SIZE = dataclasses.replace(TINY_SIZE, max_position_embeddings=4096)
ENDLESS_TOKENS = 1500


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus exposition (labels in any order)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_:]+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels} in /metrics")


def admin_model(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/admin/model", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def reload_brief(server: ServerProcess, version: str) -> dict[str, Any]:
    """An admin reload of the brief line, waited for until its record is finished."""
    response = httpx.post(
        f"{server.url}/admin/model/reload",
        json={"model": "brief_llm", "version": version},
        headers=AUTH,
        timeout=10,
    )
    assert response.status_code == 202, response.text
    url = f"{server.url}/admin/model/reload/{response.json()['reload_id']}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        record: dict[str, Any] = httpx.get(url, headers=AUTH, timeout=10).json()
        if record["finished_at"] is not None:
            return record
        time.sleep(0.05)
    raise AssertionError(f"reload of {version} did not finish")


def export_endless_brief_models(root: Path, seeds: tuple[int, ...]) -> list[str]:
    """Tiny Qwen2 exports whose ``generation_config.json`` asks for ``ENDLESS_TOKENS`` new
    tokens at least: transformers masks the end token until then, so a ``generate`` lasts as
    long as its ``max_new_tokens`` (seconds, with the server's fast mode raised to it)."""
    tokenizer = train_tokenizer(["fresh citrus for summer", "warm amber", "여름 시트러스"] * 4, 400)
    names = []
    for index, seed in enumerate(seeds):
        model = build_model(ENDLESS_SIZE, tokenizer, seed)
        model.generation_config.min_new_tokens = ENDLESS_TOKENS
        path = export_brief_model(
            model,
            tokenizer,
            root,
            step=seed,
            source=f"random weights, seed {seed}, answers of {ENDLESS_TOKENS} tokens",
            make_current=index == 0,
        )
        names.append(path.name)
    return names


def test_a_brief_generate_past_the_drain_timeout_is_answered_503_and_counted_for_its_line(
    tmp_path: Path,
    ppo_checkpoints: list[Path],
    server_factory: Callable[..., ServerProcess],
) -> None:
    root = tmp_path / "exports"
    export(ppo_checkpoints[0], root, make_current=True)
    v1, v2 = export_endless_brief_models(root, seeds=(1, 2))
    server = server_factory(
        root,
        brief_backend="llm",
        drain_timeout_s=0.2,
        drain_timeout_action="reject",
        request_timeout_s=120.0,
        **{"llm_decoding.fast.max_new_tokens": ENDLESS_TOKENS},
    )
    answers: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{server.url}/dna/create", json=BODY, timeout=120)
        )
    )
    client.start()
    deadline = time.monotonic() + 30
    while (current := admin_model(server)["models"]["brief_llm"]["current"])["in_flight"] < 1:
        assert time.monotonic() < deadline, "the request never reached the brief model"
        time.sleep(0.02)
    assert current["version"] == v1

    record = reload_brief(server, v2)  # v1 drains for 0.2 s; its generate runs for seconds
    client.join(120)

    assert record["result"] == "success" and record["drain_remaining"] == 1, record
    (answer,) = answers
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"]
    line = admin_model(server)["models"]["brief_llm"]
    assert line["drain_timeouts"] == {"reject": 1}
    assert line["current"]["version"] == v2
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    name = "model_line_drain_timeout_requests_total"
    assert metric(text, name, model="brief_llm", action="reject") == 1.0
    assert metric(text, name, model="policy", action="reject") == 0.0
    # The policy's own counter, and GET /admin/model's policy entry, did not move.
    assert metric(text, "model_reload_drain_timeout_requests_total", action="reject") == 0.0
    assert admin_model(server)["models"]["policy"]["drain_timeouts"] == {}


def add_sparse_file(root: Path, source: str, version: str, size: int) -> None:
    """Copy export ``source`` as ``version`` with one more file of ``size`` bytes in its
    manifest: a sparse file (no disk used) that hashing must still read whole, as a model of
    that size on slow storage would be."""
    target = root / version
    shutil.copytree(root / source, target)
    with (target / "shard-00002.bin").open("wb") as handle:
        handle.truncate(size)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["version"] = version
    # Hashed first: the load spends its time there, before any other file.
    manifest["files"] = {"shard-00002.bin": {"sha256": "0" * 64, "bytes": size}} | manifest["files"]
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_brief_load_past_llm_load_timeout_is_abandoned_and_counted_for_its_line(
    tmp_path: Path,
    ppo_checkpoints: list[Path],
    server_factory: Callable[..., ServerProcess],
) -> None:
    root = tmp_path / "exports"
    export(ppo_checkpoints[0], root, make_current=True)
    (v1_dir,) = export_random_brief_models(root, seeds=(1,))
    huge = "000002-step2"
    add_sparse_file(root / "brief_llm", v1_dir.name, huge, 1 << 40)  # 1 TiB: never hashed in time
    server = server_factory(root, brief_backend="llm", llm_load_timeout_s=3.0)

    record = reload_brief(server, huge)

    assert record["result"] == "load_failed", record
    assert record["error"]["reason"] == "load_timeout"
    line = admin_model(server)["models"]["brief_llm"]
    assert (line["abandoned_loads"], line["abandoned_loaders_running"]) == (1, 1)
    assert line["current"]["version"] == v1_dir.name  # the old version keeps serving
    answer = httpx.post(f"{server.url}/dna/create", json=BODY, timeout=60)
    assert answer.status_code == 200 and answer.headers["X-Brief-Model-Version"] == v1_dir.name
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric(text, "model_line_reload_abandoned_loads_total", model="brief_llm") == 1.0
    assert metric(text, "model_line_reload_abandoned_loads_total", model="policy") == 0.0
    assert metric(text, "model_line_reload_total", model="brief_llm", result="load_failed") == 1.0
    assert metric(text, "model_reload_abandoned_loads_total") == 0.0  # the policy's, unmoved
    assert admin_model(server)["abandoned_loads"] == 0


@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_a_bad_brief_current_at_startup_serves_the_newest_valid_export_and_reports_degraded(
    tmp_path: Path,
    ppo_checkpoints: list[Path],
    server_factory: Callable[..., ServerProcess],
    fault: str,
) -> None:
    root = tmp_path / "exports"
    policy = export(ppo_checkpoints[0], root, make_current=True).name
    names = [p.name for p in export_random_brief_models(root, seeds=(1, 2, 3))]
    store = root / "brief_llm"
    if fault == "corrupt":
        wanted = names[-1]  # the newest: the fallback must skip it too
        weights = store / wanted / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-8:] = bytes(8)
        weights.write_bytes(bytes(data))
        serving = names[-2]
    else:
        wanted = "000009-step9"
        serving = names[-1]
    (store / "CURRENT").write_text(wanted + "\n")

    server = server_factory(root, brief_backend="llm")

    ready = httpx.get(f"{server.url}/ready", timeout=10).json()
    assert ready["degraded_models"] == ["brief_llm"]
    assert ready["degraded"] is None  # the policy line serves what its CURRENT names
    brief = ready["models"]["brief_llm"]
    assert brief["version"] == serving
    assert (brief["degraded"]["wanted"], brief["degraded"]["serving"]) == (wanted, serving)
    expected = "ChecksumMismatchError" if fault == "corrupt" else "IncompleteExportError"
    assert expected in brief["degraded"]["reason"]
    assert ready["models"]["policy"] == {"version": policy, "degraded": None}
    line = admin_model(server)["models"]["brief_llm"]
    assert line["degraded"]["wanted"] == wanted and line["current_pointer"] == wanted
    answer = httpx.post(f"{server.url}/dna/create", json=BODY, timeout=60)
    assert answer.headers["X-Brief-Model-Version"] == serving
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    info = "model_line_info"
    assert metric(text, info, model="brief_llm", role="fallback", version=serving) == 1.0
    assert metric(text, info, model="brief_llm", role="current", version=serving) == 0.0
    assert metric(text, "model_info", role="current", version=policy) == 1.0
    assert f"DEGRADED [brief_llm]: CURRENT names {wanted}" in server.log()
    assert read_current(store) == wanted  # left for the operator to fix

    # A successful reload of the line clears it, as for the policy.
    assert reload_brief(server, names[0])["result"] == "success"
    ready = httpx.get(f"{server.url}/ready", timeout=10).json()
    assert ready["degraded_models"] == [] and ready["models"]["brief_llm"]["degraded"] is None
