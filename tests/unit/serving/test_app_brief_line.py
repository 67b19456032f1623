"""The service with its second model line, the brief LLM (TestClient runs the real app).

Covers the HTTP contract of the line: its headers on ``/dna/create``, ``{"model": ...}`` in the
admin bodies, both lines in ``GET /admin/model``, each line's own ``CURRENT`` (exports in
``exports/brief_llm/``, policy exports read in place), and auth as for the policy.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from lightning_fragrance.monitoring import OperationsMetricsCollector
from lightning_fragrance.serving.app import create_app
from lightning_fragrance.serving.loading import export, read_current, write_current
from lightning_fragrance.serving.settings import ServeSettings

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
V1, V2 = "000001-step1", "000002-step2"  # both lines happen to name their versions alike


@pytest.fixture
def export_dir(tmp_path: Path, ppo_checkpoints: list[Path], brief_llm_store: Path) -> Path:
    root = tmp_path / "exports"
    export(ppo_checkpoints[0], root, make_current=True)
    export(ppo_checkpoints[1], root)
    shutil.copytree(brief_llm_store, root / "brief_llm")
    return root


def make_client(
    export_dir: Path, collector: OperationsMetricsCollector | None = None, **overrides: Any
) -> TestClient:
    values: dict[str, Any] = {
        "export_dir": export_dir,
        "admin_token": TOKEN,
        "warmup_steps": 1,
        "drain_timeout_s": 30.0,
        "reconcile_interval_s": 0.2,
        "brief_backend": "llm",
        "request_timeout_s": 60.0,
    }
    values.update(overrides)
    collector = collector or OperationsMetricsCollector(registry=CollectorRegistry())
    return TestClient(create_app(ServeSettings(**values), collector=collector))


@pytest.fixture
def client(export_dir: Path) -> Iterator[TestClient]:
    with make_client(export_dir) as test_client:
        yield test_client


def wait_reload(client: TestClient, reload_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = client.get(f"/admin/model/reload/{reload_id}", headers=AUTH).json()
        models = client.get("/admin/model", headers=AUTH).json()["models"]
        # The record is finished a moment before its line accepts the next reload.
        if body["finished_at"] is not None and not models[body["model"]].get("reloading"):
            return body
        time.sleep(0.02)
    raise AssertionError(f"reload {reload_id} did not finish")


def dna(client: TestClient, mode: str = "fast") -> Any:
    return client.post("/dna/create", json={"user_text": "fresh citrus for summer", "mode": mode})


def test_dna_answers_name_the_brief_model_version_and_the_brief_source(
    client: TestClient,
) -> None:
    for mode in ("fast", "balanced", "creative"):
        response = dna(client, mode)
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == V1
        assert response.headers["X-Brief-Model-Version"] == V1
        # Random weights write no brief: the rules answer, and the header says so.
        assert response.headers["X-Brief-Source"] == "rules_fallback"
        assert response.json()["brief_source"] == "rules_fallback"


def test_the_rules_backend_answers_with_its_source_and_no_brief_model_version(
    export_dir: Path,
) -> None:
    with make_client(export_dir, brief_backend="rules") as client:
        response = dna(client)
    assert response.headers["X-Brief-Source"] == "rules"
    assert "X-Brief-Model-Version" not in response.headers


def test_admin_model_lists_both_lines_with_their_versions(client: TestClient) -> None:
    body = client.get("/admin/model", headers=AUTH).json()
    assert body["models"]["policy"]["current"]["version"] == V1
    assert body["models"]["policy"]["versions"] == [V1, V2]
    brief = body["models"]["brief_llm"]
    assert brief["current"]["version"] == V1
    assert brief["versions"] == [V1, V2]
    assert brief["current_pointer"] == V1
    assert body["current"]["version"] == V1  # the policy's fields stay where they were


def test_a_reload_with_model_brief_llm_moves_only_the_brief_line_and_its_current(
    client: TestClient, export_dir: Path
) -> None:
    response = client.post(
        "/admin/model/reload", json={"model": "brief_llm", "version": V2}, headers=AUTH
    )
    assert response.status_code == 202, response.text
    assert response.json()["model"] == "brief_llm"
    status = wait_reload(client, response.json()["reload_id"])
    assert status["result"] == "success" and status["model"] == "brief_llm"
    assert set(status["phase_seconds"]) >= {"loading", "validating", "warming", "draining"}
    answer = dna(client)
    assert answer.headers["X-Brief-Model-Version"] == V2
    assert answer.headers["X-Model-Version"] == V1
    assert read_current(export_dir / "brief_llm") == V2
    assert read_current(export_dir) == V1


def test_a_reload_without_a_model_field_is_the_policys_as_before(client: TestClient) -> None:
    response = client.post("/admin/model/reload", json={"version": V2}, headers=AUTH)
    assert wait_reload(client, response.json()["reload_id"])["model"] == "policy"
    answer = dna(client)
    assert answer.headers["X-Model-Version"] == V2
    assert answer.headers["X-Brief-Model-Version"] == V1


def test_a_rollback_with_model_brief_llm_returns_the_brief_line_to_its_previous_version(
    client: TestClient, export_dir: Path
) -> None:
    reload_id = client.post(
        "/admin/model/reload", json={"model": "brief_llm", "version": V2}, headers=AUTH
    ).json()["reload_id"]
    wait_reload(client, reload_id)
    response = client.post("/admin/model/rollback", json={"model": "brief_llm"}, headers=AUTH)
    assert response.status_code == 202, response.text
    assert wait_reload(client, response.json()["reload_id"])["result"] == "rolled_back"
    assert dna(client).headers["X-Brief-Model-Version"] == V1
    assert read_current(export_dir / "brief_llm") == V1


def test_changing_the_brief_lines_current_on_disk_reloads_it(
    client: TestClient, export_dir: Path
) -> None:
    write_current(export_dir / "brief_llm", V2)
    deadline = time.monotonic() + 60
    while dna(client).headers["X-Brief-Model-Version"] != V2:
        assert time.monotonic() < deadline, "the brief line did not follow its CURRENT"
        time.sleep(0.05)
    assert read_current(export_dir) == V1


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/admin/model/reload", {"model": "nope"}, 404),
        ("/admin/model/rollback", {"model": "nope"}, 404),
        ("/admin/model/reload", {"model": 5}, 422),
        ("/admin/model/rollback", {"model": ["brief_llm"]}, 422),
        ("/admin/model/rollback", {"model": "brief_llm", "extra": 1}, 422),
        ("/admin/model/reload", {"model": "brief_llm", "version": "../x"}, 400),
        ("/admin/model/reload", {"model": "brief_llm", "version": "000009-step9"}, 404),
    ],
)
def test_malformed_or_unknown_model_bodies_get_4xx(
    client: TestClient, path: str, body: dict[str, Any], status: int
) -> None:
    response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == status, response.text


def test_brief_llm_on_a_rules_backend_is_404_and_says_how_to_enable_it(export_dir: Path) -> None:
    with make_client(export_dir, brief_backend="rules") as client:
        response = client.post("/admin/model/reload", json={"model": "brief_llm"}, headers=AUTH)
    assert response.status_code == 404
    assert "brief_backend=llm" in response.json()["detail"]


def test_admin_model_bodies_without_the_token_get_401_and_without_a_token_set_403(
    export_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"model": "brief_llm"}
    with make_client(export_dir) as client:
        for path in ("/admin/model/reload", "/admin/model/rollback"):
            assert client.post(path, json=body).status_code == 401
            wrong = {"Authorization": "Bearer wrong"}
            assert client.post(path, json=body, headers=wrong).status_code == 401
    monkeypatch.delenv("LF_ADMIN_TOKEN", raising=False)
    with make_client(export_dir, admin_token=None) as client:
        assert client.post("/admin/model/reload", json=body, headers=AUTH).status_code == 403


def test_concurrent_greedy_requests_get_the_answers_they_get_one_at_a_time(
    client: TestClient,
) -> None:
    texts = [f"fresh citrus number {i}, not too sweet" for i in range(8)]

    def ask(text: str) -> tuple[int, bytes]:
        response = client.post("/dna/create", json={"user_text": text, "mode": "fast"})
        return response.status_code, response.content

    alone = [ask(text) for text in texts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, texts))
    assert together == alone
    assert all(status == 200 for status, _ in together)


def test_metrics_count_the_real_models_briefs_and_each_lines_versions_and_reloads(
    export_dir: Path,
) -> None:
    collector = OperationsMetricsCollector(registry=CollectorRegistry())
    with make_client(export_dir, collector) as client:
        for mode in ("fast", "balanced", "creative"):
            assert dna(client, mode).status_code == 200
        reload_id = client.post(
            "/admin/model/reload", json={"model": "brief_llm", "version": V2}, headers=AUTH
        ).json()["reload_id"]
        wait_reload(client, reload_id)
        text = client.get("/metrics").text
    for mode in ("fast", "balanced", "creative"):
        assert f'llm_brief_total{{mode="{mode}",status="failure"}} 1.0' in text
        assert f'llm_brief_repairs_total{{mode="{mode}",repair_type="rule_fallback"}} 1.0' in text
        assert f'llm_brief_latency_seconds_count{{mode="{mode}"}} 1.0' in text
    assert f'model_line_info{{model="brief_llm",role="current",version="{V2}"}} 1.0' in text
    assert f'model_line_info{{model="brief_llm",role="current",version="{V1}"}} 0.0' in text
    assert f'model_line_info{{model="policy",role="current",version="{V1}"}} 1.0' in text
    assert 'model_line_reload_total{model="brief_llm",result="success"} 1.0' in text
    assert 'model_line_reload_phase_seconds_count{model="brief_llm",phase="draining"} 1.0' in text
    # The policy's own model_* series are untouched by the brief line's reload.
    assert 'model_reload_total{result="success"} 0.0' in text
    assert f'model_info{{role="current",version="{V1}"}} 1.0' in text


def test_a_brief_past_the_request_timeout_gets_504_naming_the_setting(export_dir: Path) -> None:
    # 1 ms cannot hold a generate of up to 96 tokens: the brief stage times out, and the answer
    # says which limit it ran into (the generation itself finishes on its own thread).
    with make_client(export_dir, request_timeout_s=0.001) as test_client:
        response = dna(test_client)
    assert response.status_code == 504, response.text
    assert response.json()["detail"] == "brief exceeded request_timeout_s=0.001"
