"""The FastAPI service in-process (TestClient runs the real app and its lifespan).

Covers the HTTP contract: auth (401/403), validation (400/404/409/422/429/504), bad exports
through the admin reload, rollback, the CURRENT watch and the metrics. The real-socket tests
(zero drop under load, SIGTERM, several workers) are in tests/integration/serving.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from lightning_fragrance.fragrance import Brief, parse_brief
from lightning_fragrance.monitoring import BriefMode, OperationsMetricsCollector
from lightning_fragrance.serving.app import create_app
from lightning_fragrance.serving.brief import BriefResult, BriefSource
from lightning_fragrance.serving.loading import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    export,
    read_current,
    sha256_file,
    write_current,
)
from lightning_fragrance.serving.settings import ADMIN_TOKEN_ENV, ServeSettings

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
V1, V2 = "000001-step1", "000002-step2"


@pytest.fixture
def export_dir(tmp_path: Path, ppo_checkpoints: list[Path]) -> Path:
    root = tmp_path / "exports"
    export(ppo_checkpoints[0], root, make_current=True)
    export(ppo_checkpoints[1], root)
    return root


def make_client(
    export_dir: Path, brief_generator: Any = None, **overrides: Any
) -> tuple[TestClient, OperationsMetricsCollector]:
    values: dict[str, Any] = {
        "export_dir": export_dir,
        "admin_token": TOKEN,
        "warmup_steps": 1,
        "drain_timeout_s": 5.0,
        "reconcile_interval_s": 0.2,
    }
    values.update(overrides)
    collector = OperationsMetricsCollector(registry=CollectorRegistry())
    app = create_app(ServeSettings(**values), collector=collector, brief_generator=brief_generator)
    return TestClient(app), collector


@pytest.fixture
def client(export_dir: Path) -> Iterator[TestClient]:
    test_client, _ = make_client(export_dir)
    with test_client:
        yield test_client


def wait_reload(client: TestClient, reload_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = client.get(f"/admin/model/reload/{reload_id}", headers=AUTH).json()
        if body["finished_at"] is not None:
            return body
        time.sleep(0.02)
    raise AssertionError(f"reload {reload_id} did not finish")


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def create(client: TestClient, text: str = "fresh citrus for summer") -> Any:
    return client.post("/dna/create", json={"user_text": text, "mode": "fast"})


def test_dna_create_returns_a_formula_with_the_model_version(client: TestClient) -> None:
    response = create(client)
    assert response.status_code == 200
    assert response.headers["X-Model-Version"] == V1
    body = response.json()
    assert body["version"] == V1
    assert body["brief_source"] == "rules"
    assert Brief.model_validate(body["brief"]) == parse_brief("fresh citrus for summer")
    assert body["dna"]["ingredients"] and body["dna"]["concentration_pct"] > 0


def test_health_needs_no_token_and_ready_reports_the_version(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "alive"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["version"] == V1


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}]
)
def test_admin_routes_answer_401_without_the_right_bearer_token(
    client: TestClient, headers: dict[str, str]
) -> None:
    for method, path in (("post", "/admin/model/reload"), ("get", "/admin/model")):
        response = getattr(client, method)(path, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_admin_routes_answer_403_and_say_how_to_enable_them_without_a_token(
    export_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    test_client, _ = make_client(export_dir, admin_token=None)
    with test_client:
        response = test_client.post("/admin/model/reload", headers=AUTH)
        assert response.status_code == 403
        assert ADMIN_TOKEN_ENV in response.json()["detail"]
        assert test_client.get("/health").status_code == 200


def test_the_token_from_the_environment_enables_the_admin_routes(
    export_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-env")
    test_client, _ = make_client(export_dir, admin_token=None)
    with test_client:
        response = test_client.get("/admin/model", headers={"Authorization": "Bearer from-env"})
        assert response.status_code == 200


@pytest.mark.parametrize(
    "version", ["../000001-step1", "..", "http://evil.example/model", "s3://bucket/x", "a/b"]
)
def test_reload_rejects_paths_and_urls_with_400(client: TestClient, version: str) -> None:
    response = client.post("/admin/model/reload", json={"version": version}, headers=AUTH)
    assert response.status_code == 400


def test_reload_of_an_unknown_version_is_404_and_lists_the_known_ones(client: TestClient) -> None:
    response = client.post("/admin/model/reload", json={"version": "000099-x"}, headers=AUTH)
    assert response.status_code == 404
    assert V2 in response.json()["detail"]


def test_reload_switches_the_version_and_points_current_at_it(
    client: TestClient, export_dir: Path
) -> None:
    response = client.post("/admin/model/reload", headers=AUTH)
    assert response.status_code == 202
    body = wait_reload(client, response.json()["reload_id"])
    assert body["result"] == "success" and body["to_version"] == V2
    assert set(body["phase_seconds"]) >= {"loading", "validating", "warming", "switching"}
    assert create(client).headers["X-Model-Version"] == V2
    wait_for(lambda: read_current(export_dir) == V2)


def test_a_second_reload_during_a_drain_gets_409(client: TestClient) -> None:
    manager = client.app.state.serving.manager  # type: ignore[attr-defined]
    with manager.lease():  # an in-flight request on the old worker keeps the reload draining
        first = client.post("/admin/model/reload", json={"version": V2}, headers=AUTH)
        assert first.status_code == 202
        wait_for(lambda: manager.current_version == V2)
        second = client.post("/admin/model/reload", json={"version": V1}, headers=AUTH)
        assert second.status_code == 409
        assert client.post("/admin/model/rollback", headers=AUTH).status_code == 409
    assert wait_reload(client, first.json()["reload_id"])["result"] == "success"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"user_text": ""},
        {"user_text": "citrus", "mode": "turbo"},
        {"user_text": "citrus", "extra": 1},
        {"user_text": 42},
        {"user_text": "x" * 2001},
    ],
)
def test_bad_dna_bodies_get_422(client: TestClient, body: dict[str, Any]) -> None:
    assert client.post("/dna/create", json=body).status_code == 422


def test_an_oversized_body_gets_422_before_it_is_parsed(client: TestClient) -> None:
    response = client.post(
        "/dna/create",
        content=json.dumps({"user_text": "citrus " * 5000}),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    assert "max_body_bytes" in response.json()["detail"]


class GatedBrief:
    """A real BriefGenerator (the rules) that waits for a gate: a slow brief stage."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def generate(self, user_text: str, mode: BriefMode) -> BriefResult:
        self.entered.set()
        self.gate.wait(10)
        return BriefResult(brief=parse_brief(user_text), source=BriefSource.RULES)


def test_requests_past_the_inflight_cap_get_429(export_dir: Path) -> None:
    slow = GatedBrief()
    test_client, _ = make_client(export_dir, brief_generator=slow, max_inflight=1)
    with test_client:
        holder: list[int] = []
        thread = threading.Thread(target=lambda: holder.append(create(test_client).status_code))
        thread.start()
        assert slow.entered.wait(10)
        rejected = create(test_client)
        assert rejected.status_code == 429 and rejected.headers["Retry-After"] == "1"
        slow.gate.set()
        thread.join(10)
        assert holder == [200]


def test_a_request_past_the_request_timeout_gets_504(export_dir: Path) -> None:
    slow = GatedBrief()
    test_client, _ = make_client(export_dir, brief_generator=slow, request_timeout_s=0.2)
    with test_client:
        assert create(test_client).status_code == 504
        slow.gate.set()


@pytest.mark.parametrize("action", ["reject", "leave_running"])
def test_a_request_slower_than_the_drain_timeout_is_handled_as_configured_and_counted(
    export_dir: Path, action: str
) -> None:
    slow = GatedBrief()
    test_client, collector = make_client(
        export_dir, brief_generator=slow, drain_timeout_s=0.2, drain_timeout_action=action
    )
    with test_client:
        holder: list[Any] = []
        thread = threading.Thread(target=lambda: holder.append(create(test_client)))
        thread.start()
        assert slow.entered.wait(10)
        reload = client_reload(test_client, V2)
        record = wait_reload(test_client, reload)
        assert record["drain_remaining"] == 1
        slow.gate.set()
        thread.join(10)
        response = holder[0]
        if action == "reject":
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        else:
            assert response.status_code == 200 and response.headers["X-Model-Version"] == V1
        info = test_client.get("/admin/model", headers=AUTH).json()
        assert info["drain_timeouts"] == {action: 1}
        counted = collector.registry.get_sample_value(
            "model_reload_drain_timeout_requests_total", {"action": action}
        )
        assert counted == 1.0


def test_cheap_work_moves_onto_the_event_loop_after_a_trial(export_dir: Path) -> None:
    # A generous limit: this checks the mechanism, not this machine's speed.
    test_client, _ = make_client(export_dir, inline_work_ms=200.0)
    with test_client:
        responses = [create(test_client, f"fresh citrus no {i}") for i in range(40)]
        assert {r.status_code for r in responses} == {200}
        assert {r.headers["X-Model-Version"] for r in responses} == {V1}
        placement = test_client.get("/admin/model", headers=AUTH).json()["work_placement"]
    assert placement["placement"] == "inline"
    assert placement["trials"] == 1
    assert 0 < placement["inline_mean_ms"] < 200.0


class SleepyBrief:
    """The rules after a sleep: a brief stage that waits on I/O (a remote LLM, say)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def generate(self, user_text: str, mode: BriefMode) -> BriefResult:
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(30)
        else:
            time.sleep(self.seconds)
        return BriefResult(brief=parse_brief(user_text), source=BriefSource.RULES)


def test_slow_work_stays_in_the_pool_so_the_loop_keeps_answering(export_dir: Path) -> None:
    sleepy = SleepyBrief(0.15)  # over 25x the 5 ms limit: never worth a trial
    test_client, _ = make_client(export_dir, brief_generator=sleepy, inline_work_ms=5.0)
    with test_client:
        for _ in range(20):  # past probe_every (16)
            assert create(test_client).status_code == 200
        placement = test_client.get("/admin/model", headers=AUTH).json()["work_placement"]
        assert placement["placement"] == "pool" and placement["trials"] == 0
        # A request blocked in the brief stage does not block the loop: /health answers
        # while it waits. Inline, /health would wait behind it until the gate times out.
        sleepy.gate = threading.Event()
        holder: list[int] = []
        thread = threading.Thread(target=lambda: holder.append(create(test_client).status_code))
        thread.start()
        assert sleepy.entered.wait(10)
        health: list[int] = []
        answered = threading.Event()

        def ask_health() -> None:
            health.append(test_client.get("/health").status_code)
            answered.set()

        threading.Thread(target=ask_health, daemon=True).start()
        assert answered.wait(5), "/health waited for the blocked request: the loop was blocked"
        assert health == [200]
        sleepy.gate.set()
        thread.join(10)
        assert holder == [200]


def test_inline_work_zero_keeps_every_request_in_the_pool(export_dir: Path) -> None:
    test_client, _ = make_client(export_dir, inline_work_ms=0.0)
    with test_client:
        for i in range(30):
            assert create(test_client, f"green floral no {i}").status_code == 200
        placement = test_client.get("/admin/model", headers=AUTH).json()["work_placement"]
    assert placement["placement"] == "pool" and placement["trials"] == 0


def client_reload(client: TestClient, version: str) -> str:
    response = client.post("/admin/model/reload", json={"version": version}, headers=AUTH)
    assert response.status_code == 202, response.text
    return str(response.json()["reload_id"])


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _reseal(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"] = sha256_file(directory / name)
        entry["bytes"] = (directory / name).stat().st_size
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def _corrupt(directory: Path) -> None:
    data = bytearray((directory / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / WEIGHTS_FILE).write_bytes(bytes(data))


def _truncate(directory: Path) -> None:
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:64])
    _reseal(directory)


def _wrong_shape(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["hparams"]["hidden_sizes"] = [8, 8]
    (directory / "config.json").write_text(json.dumps(config))
    _reseal(directory)


def _pickle(directory: Path) -> None:
    marker = directory.parent.parent / "pwned"
    with (directory / WEIGHTS_FILE).open("wb") as fh:
        pickle.dump({"w": _Payload(marker)}, fh)
    _reseal(directory)


def _nan_statistics(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(directory / WEIGHTS_FILE))
    weights["obs_normalizer.var"] = -weights["obs_normalizer.var"] - 1.0
    save_file(weights, str(directory / WEIGHTS_FILE))
    _reseal(directory)


@pytest.mark.parametrize(
    ("damage", "result", "reason"),
    [
        (_corrupt, "validation_failed", "checksum_mismatch"),
        (_truncate, "load_failed", "weights_format"),
        (_wrong_shape, "validation_failed", "state_dict_mismatch"),
        (_pickle, "load_failed", "weights_format"),
        (_nan_statistics, "warmup_failed", "WarmupError"),
    ],
)
def test_a_bad_export_fails_the_reload_with_a_reason_and_the_old_version_keeps_serving(
    export_dir: Path, damage: Any, result: str, reason: str
) -> None:
    bad = export_dir / "000003-bad"
    shutil.copytree(export_dir / V2, bad)
    damage(bad)
    test_client, collector = make_client(export_dir)
    with test_client:
        before = collector.registry.get_sample_value("model_reload_total", {"result": result})
        record = wait_reload(test_client, client_reload(test_client, bad.name))
        assert record["result"] == result
        assert record["phase"] == "failed"
        assert record["error"]["reason"] == reason
        response = create(test_client)
        assert response.status_code == 200 and response.headers["X-Model-Version"] == V1
        after = collector.registry.get_sample_value("model_reload_total", {"result": result})
        assert after == (before or 0.0) + 1.0
        assert read_current(export_dir) == V1
    assert not (export_dir.parent / "pwned").exists()


def test_rollback_returns_to_the_previous_version_and_moves_current_back(
    export_dir: Path,
) -> None:
    test_client, collector = make_client(export_dir, keep_previous_s=30.0)
    with test_client:
        wait_reload(test_client, client_reload(test_client, V2))
        wait_for(lambda: read_current(export_dir) == V2)
        # The reload's record is finished a moment before its lock is free (and the CURRENT
        # follow-up may still check the pointer): on a loaded machine the first attempt can
        # meet "a reload is running" (409). One at a time is the rule; retry until it is free.
        response = test_client.post("/admin/model/rollback", headers=AUTH)
        deadline = time.monotonic() + 20
        while response.status_code == 409 and "running" in response.json()["detail"]:
            assert time.monotonic() < deadline, response.json()
            time.sleep(0.05)
            response = test_client.post("/admin/model/rollback", headers=AUTH)
        assert response.status_code == 202
        record = wait_reload(test_client, response.json()["reload_id"])
        assert record["result"] == "rolled_back" and record["to_version"] == V1
        reloads = collector.registry.get_sample_value
        assert reloads("model_reload_total", {"result": "rolled_back"}) == 1.0
        assert reloads("model_reload_total", {"result": "success"}) == 1.0
        assert create(test_client).headers["X-Model-Version"] == V1
        wait_for(lambda: read_current(export_dir) == V1)


def test_rollback_with_no_earlier_version_is_409(client: TestClient) -> None:
    response = client.post("/admin/model/rollback", headers=AUTH)
    assert response.status_code == 409
    assert "no earlier version" in response.json()["detail"]


def test_changing_current_on_disk_reloads_this_process(
    client: TestClient, export_dir: Path
) -> None:
    write_current(export_dir, V2)
    wait_for(lambda: create(client).headers["X-Model-Version"] == V2)


def test_a_new_export_becomes_current_by_itself_when_auto_promotion_is_on(
    export_dir: Path, ppo_checkpoints: list[Path]
) -> None:
    test_client, _ = make_client(export_dir, auto_promote_exports=True)
    with test_client:
        wait_for(lambda: create(test_client).headers["X-Model-Version"] == V2)
        newer = export(ppo_checkpoints[0], export_dir)
        wait_for(lambda: create(test_client).headers["X-Model-Version"] == newer.name)


def test_metrics_count_requests_by_route_template_and_show_the_model(
    client: TestClient,
) -> None:
    create(client)
    client.post("/dna/create", json={})
    text = client.get("/metrics").text
    assert 'api_request_total{endpoint="/dna/create",method="POST",status="200"} 1.0' in text
    assert 'api_request_total{endpoint="/dna/create",method="POST",status="422"} 1.0' in text
    assert f'model_info{{role="current",version="{V1}"}} 1.0' in text


def test_a_chunked_body_over_the_limit_gets_422(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"user_text": "'
        for _ in range(40):
            yield b"citrus " * 100
        yield b'"}'

    response = client.post(
        "/dna/create", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "max_body_bytes" in response.json()["detail"]


# --------------------------------------------------------------------------- hostile input


JSON = {"content-type": "application/json"}
MALFORMED_BODIES = {
    "lone surrogate in a value": b'{"user_text": "\\ud800", "mode": "fast"}',
    "lone surrogate in an enum value": b'{"user_text": "citrus", "mode": "\\udfff"}',
    "lone surrogate as a key": b'{"user_text": "citrus", "\\ud800": 1}',
    "invalid UTF-8": b'{"user_text": "\xff\xfe"}',
    "NaN literal": b'{"user_text": NaN}',
    "nesting past the parser's limit": b"[" * 5000 + b"]" * 5000,
    "cut-off JSON": b'{"user_text": ',
    "empty body": b"",
    "an array": b"[1, 2]",
    "a wrong type": b'{"user_text": 5}',
}


def test_a_json_body_declared_as_another_media_type_gets_422_and_the_way_out(
    client: TestClient,
) -> None:
    body = b'{"user_text": "fresh citrus", "mode": "fast"}'
    response = client.post("/dna/create", content=body, headers={"content-type": "text/plain"})
    assert response.status_code == 422
    assert "Content-Type: application/json" in response.json()["detail"][0]["msg"]
    typed = client.post("/dna/create", content=body, headers={"content-type": "application/json"})
    assert typed.status_code == 200


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_every_malformed_dna_body_gets_422_with_a_reason_never_500(
    client: TestClient, body: bytes
) -> None:
    response = client.post("/dna/create", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail and all("msg" in error and "loc" in error for error in detail)
    assert all("input" not in error for error in detail)  # nothing of the body is echoed


@pytest.mark.parametrize(
    "body",
    [
        b'{"version": "\\ud800"}',
        b'{"\\ud800": "x"}',
        b'{"version": "\xff"}',
        b'{"version": NaN}',
        b"[" * 5000 + b"]" * 5000,
        b'{"version": 5}',
    ],
    ids=["surrogate value", "surrogate key", "invalid UTF-8", "NaN", "deep nesting", "type"],
)
def test_every_malformed_admin_body_gets_422_never_500(client: TestClient, body: bytes) -> None:
    response = client.post("/admin/model/reload", content=body, headers={**JSON, **AUTH})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_a_symlinked_version_directory_is_skipped_and_refused_with_400(
    export_dir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(export_dir / V1, elsewhere / V1)
    (export_dir / "000009-linked").symlink_to(elsewhere / V1)
    test_client, _ = make_client(export_dir)
    with test_client:
        info = test_client.get("/admin/model", headers=AUTH)
        assert info.status_code == 200 and info.json()["versions"] == [V1, V2]
        named = test_client.post(
            "/admin/model/reload", json={"version": "000009-linked"}, headers=AUTH
        )
        assert named.status_code == 400 and "symbolic link" in named.json()["detail"]
        newest = test_client.post("/admin/model/reload", headers=AUTH)
        assert newest.status_code == 202 and newest.json()["version"] == V2


def test_auto_promotion_never_points_current_at_an_export_that_fails_a_reload(
    export_dir: Path,
) -> None:
    _nan_statistics(export_dir / V2)  # loads and validates, acts NaN: the warm-up refuses it
    test_client, collector = make_client(export_dir, auto_promote_exports=True)
    failed = {"result": "warmup_failed"}
    with test_client:
        wait_for(lambda: collector.registry.get_sample_value("model_reload_total", failed) == 1)
        assert read_current(export_dir) == V1
        assert create(test_client).headers["X-Model-Version"] == V1


def test_a_server_whose_current_names_a_bad_export_serves_the_newest_valid_one_degraded(
    export_dir: Path, ppo_checkpoints: list[Path]
) -> None:
    bad = export(ppo_checkpoints[1], export_dir)
    _nan_statistics(bad)
    write_current(export_dir, bad.name)
    test_client, _ = make_client(export_dir)
    with test_client:
        ready = test_client.get("/ready")
        assert ready.status_code == 200 and ready.json()["version"] == V2
        assert ready.json()["degraded"]["wanted"] == bad.name
        info = test_client.get("/admin/model", headers=AUTH).json()
        assert info["degraded"]["serving"] == V2 and info["current_pointer"] == bad.name
        assert "WarmupError" in info["degraded"]["reason"]
        assert create(test_client).headers["X-Model-Version"] == V2
        text = test_client.get("/metrics").text
        assert f'model_info{{role="fallback",version="{V2}"}} 1.0' in text
        assert read_current(export_dir) == bad.name  # left for the operator to fix

        wait_reload(test_client, client_reload(test_client, V1))
        wait_for(lambda: read_current(export_dir) == V1)
        assert test_client.get("/ready").json()["degraded"] is None


def test_the_load_timeout_setting_reaches_the_policy_lines_manager(export_dir: Path) -> None:
    test_client, _ = make_client(export_dir, load_timeout_s=7.5)
    assert test_client.app.state.serving.manager.load_timeout == 7.5  # type: ignore[attr-defined]
