"""The FastAPI service: ``/dna/create`` on a hot-reloadable policy, admin, health and metrics.

Routes:

- ``POST /dna/create`` ``{user_text, mode}`` → brief → policy → formula (``X-Model-Version``;
  ``X-Brief-Source``; ``X-Brief-Model-Version`` when the brief LLM line serves).
- ``POST /admin/model/reload`` (optional ``{"model": ..., "version": ...}``) → 202 + reload id;
  ``GET /admin/model/reload/{reload_id}``; ``GET /admin/model`` (both model lines);
  ``POST /admin/model/rollback`` (optional ``{"model": ...}``). ``model`` is ``policy``
  (the default) or ``brief_llm``.
  Bearer token, compared in constant time; no token configured = 403 (DESIGN.md §7).
- ``GET /health`` (liveness), ``GET /ready`` (stays 200 during a reload, 503 after SIGTERM),
  ``GET /metrics``.

Several processes (uvicorn workers, replicas on a shared export store) converge through
each model line's ``CURRENT``: an admin reload swaps this process's model first and then rewrites
``CURRENT``; every process watches the file and runs its own blue/green swap. That protocol is
``serving.current_sync`` (no FastAPI); this module is HTTP: bodies, auth, limits, answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import torch
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lightning_fragrance.fragrance import (
    Brief,
    BriefError,
    FormulaDNA,
    encode_brief,
    formulate,
    parse_brief,
)
from lightning_fragrance.fragrance.catalog import default_catalog
from lightning_fragrance.fragrance.dna import decode_action
from lightning_fragrance.monitoring import BriefMode, ModelLine, OperationsMetricsCollector
from lightning_fragrance.serving.admission import LongBodyAdmission
from lightning_fragrance.serving.brief import BriefGenerator, BriefResult, RuleBasedBriefGenerator
from lightning_fragrance.serving.brief_line import BRIEF_MODEL_NAME, BriefLLMLine, BriefLLMSettings
from lightning_fragrance.serving.current_sync import CurrentSync
from lightning_fragrance.serving.hot_reload import (
    DrainTimeoutExceeded,
    HotReloadManager,
    NoModelLoaded,
    NoPreviousVersion,
    ReloadInProgress,
)
from lightning_fragrance.serving.loading import (
    ExportNotFoundError,
    ExportStore,
    InvalidVersionNameError,
    LoadedModel,
    validate_version_name,
)
from lightning_fragrance.serving.observer import CollectorReloadObserver
from lightning_fragrance.serving.placement import WorkPlacement
from lightning_fragrance.serving.settings import ADMIN_TOKEN_ENV, BriefBackend, ServeSettings

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Model-Version"
BRIEF_VERSION_HEADER = "X-Brief-Model-Version"
BRIEF_SOURCE_HEADER = "X-Brief-Source"
POLICY_MODEL_NAME = ModelLine.POLICY.value
WARMUP_TEXTS = (
    "a fresh citrus scent for summer, not too sweet",
    "warm amber and vanilla for winter evenings",
    "a green floral for spring",
)

B = TypeVar("B", bound=BaseModel)

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


# --------------------------------------------------------------------------- request bodies


class DnaRequest(BaseModel):
    """Body of ``POST /dna/create``."""

    model_config = ConfigDict(extra="forbid")

    user_text: str = Field(min_length=1)
    mode: BriefMode = BriefMode.BALANCED


class DnaResponse(BaseModel):
    """Body of a ``/dna/create`` answer (also sent as ``X-Model-Version``)."""

    version: str
    brief: Brief
    brief_source: str
    dna: FormulaDNA


class ReloadRequest(BaseModel):
    """Optional body of ``POST /admin/model/reload`` (``model`` absent = the policy)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    version: str | None = None


class RollbackRequest(BaseModel):
    """Optional body of ``POST /admin/model/rollback`` (``model`` absent = the policy)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None


# --------------------------------------------------------------------------- model plumbing


@functools.cache
def _warmup_inputs() -> tuple[list[Brief], torch.Tensor]:
    # Parsed and encoded once per process: they do not depend on the model, and a warm-up runs
    # on the reload thread while requests are served, so every bit of Python it skips is GIL
    # time left to the requests.
    catalog = default_catalog()
    briefs = [parse_brief(text) for text in WARMUP_TEXTS]
    observations = torch.stack([torch.as_tensor(encode_brief(b, catalog)) for b in briefs])
    return briefs, observations


def policy_warmup(loaded: LoadedModel) -> torch.Tensor:
    """One warm-up step: the policy and the decoder on fixed briefs; returns the raw actions.

    The actions are returned (not the formula) so the manager can check them for NaN/inf: a
    policy with corrupted normaliser statistics loads and validates but acts with NaN.
    """
    briefs, observations = _warmup_inputs()
    with torch.no_grad():
        actions = loaded.model.act(observations, deterministic=True)  # type: ignore[operator]
    if bool(torch.isfinite(actions).all()):
        decode_action(actions[0], briefs[0])
    return actions


def build_manager(
    store: ExportStore, settings: ServeSettings, collector: OperationsMetricsCollector
) -> HotReloadManager[LoadedModel]:
    """A manager that loads versions from ``store`` (default: CURRENT, else the newest)."""

    def load(version: str | None) -> LoadedModel:
        name = version or store.current() or store.newest()
        if name is None:
            raise ExportNotFoundError(
                f"no complete export in {store.location}; create one with "
                "`lf-export ckpt_path=<checkpoint> export_dir=<dir>`"
            )
        return store.load(name)

    return HotReloadManager(
        load,
        warmup_func=policy_warmup,
        warmup_steps=settings.warmup_steps,
        drain_timeout=settings.drain_timeout_s,
        drain_timeout_action=settings.drain_timeout_action,
        keep_previous_s=settings.keep_previous_s,
        revert_error_rate=settings.revert_error_rate,
        revert_min_requests=settings.revert_min_requests,
        observer=CollectorReloadObserver(collector),
        load_timeout=settings.load_timeout_s,
    )


def build_brief_line(
    settings: ServeSettings,
    collector: OperationsMetricsCollector,
    *,
    stopping: Callable[[], bool],
) -> BriefLLMLine:
    """The brief LLM model line over ``settings.brief_llm_store_dir()``."""
    line_settings = BriefLLMSettings(
        decoding=settings.llm_decoding,
        warmup_steps=settings.llm_warmup_steps,
        load_timeout_s=settings.llm_load_timeout_s,
        drain_timeout_s=settings.drain_timeout_s,
        drain_timeout_action=settings.drain_timeout_action.value,
        max_batch_size=settings.llm_max_batch_size,
        batch_wait_s=settings.llm_batch_wait_ms / 1000,
        auto_promote=settings.auto_promote_exports,
    )
    return BriefLLMLine(
        ExportStore(settings.brief_llm_store_dir()),
        line_settings,
        collector=collector,
        observer=CollectorReloadObserver(collector, model=ModelLine.BRIEF_LLM),
        stopping=stopping,
    )


@dataclass
class ServingState:
    """Everything the routes share inside one process."""

    settings: ServeSettings
    store: ExportStore
    collector: OperationsMetricsCollector
    manager: HotReloadManager[LoadedModel]
    brief: BriefGenerator
    observer: CollectorReloadObserver
    sync: CurrentSync
    # The brief LLM model line (``brief_backend=llm``); None: ``brief`` answers alone.
    brief_line: BriefLLMLine | None = None
    shutting_down: bool = False
    inflight: int = 0
    # Work that `placement` keeps off the event loop (slow briefs, large policies) runs here,
    # not in asyncio's default pool (shared with every other to_thread call): a pool of its
    # own, sized by `work_threads`, bounds the threads that contend for the GIL.
    executor: ThreadPoolExecutor = field(default_factory=ThreadPoolExecutor)
    placement: WorkPlacement = field(default_factory=lambda: WorkPlacement(limit_s=0.0))

    @property
    def admin_token(self) -> str | None:
        """The configured bearer token, if any."""
        return self.settings.resolved_admin_token()


def _state(request: Request) -> ServingState:
    state: ServingState = request.app.state.serving
    return state


# --------------------------------------------------------------------------- ASGI middleware


class RequestGuardMiddleware:
    """Body-size bound (422), API metrics per route template, and ``X-Model-Version``.

    A plain ASGI middleware rather than ``BaseHTTPMiddleware``: it adds no task or stream copy
    per request, which matters for the throughput target against LitServe.
    """

    def __init__(self, app: ASGIApp, state_getter: Callable[[], ServingState]) -> None:
        self.app = app
        self.state_getter = state_getter

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state_getter()
        limit = state.settings.max_body_bytes
        start = time.perf_counter()
        status = {"code": 500}
        length = _content_length(scope)
        if length is not None and length > limit:
            await _send_json(send, 422, _too_large(length, limit))
            self._record(state, scope, 422, start)
            return

        received = 0
        too_large = False

        async def limited_receive() -> Any:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Tell the app the client went away (it stops reading); our 422 replaces
                    # whatever it answers. Raising instead would surface as FastAPI's 400.
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Any) -> None:
            if too_large:
                return
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-model-version" for k, _ in headers):
                    version = state.manager.current_version
                    if version:
                        headers.append((b"x-model-version", version.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not too_large:
                self._record(state, scope, 500, start)
                raise
        if too_large:
            status["code"] = 422
            await _send_json(send, 422, _too_large(received, limit))
        self._record(state, scope, status["code"], start)

    @staticmethod
    def _record(
        state: ServingState, scope: MutableMapping[str, Any], code: int, start: float
    ) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "/*"
        with contextlib.suppress(ValueError):
            state.collector.record_api_request(
                endpoint, scope["method"], code, time.perf_counter() - start
            )


def _content_length(scope: MutableMapping[str, Any]) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def _too_large(size: int, limit: int) -> dict[str, Any]:
    return {
        "detail": f"request body of {size} bytes exceeds max_body_bytes={limit}; "
        "send a shorter user_text"
    }


async def _send_json(send: Callable[[Any], Awaitable[None]], status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- admin auth


def require_admin(request: Request) -> None:
    """Bearer-token check for the admin routes (constant-time compare).

    Raises:
        HTTPException: 403 when no token is configured (admin disabled), 401 when the token is
            missing or wrong.
    """
    token = _state(request).admin_token
    if not token:
        raise HTTPException(
            status_code=403,
            detail=f"admin routes are disabled: set the {ADMIN_TOKEN_ENV} environment variable "
            "(or serve.admin_token) to a secret and send 'Authorization: Bearer <token>'",
        )
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    # compare_digest on bytes of possibly different lengths still takes time independent of
    # where they differ (hmac docs); LitServe's plain != leaks the prefix length.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        supplied.strip().encode(), token.encode()
    ):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong admin token; send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


# --------------------------------------------------------------------------- app factory


def create_app(
    settings: ServeSettings,
    *,
    collector: OperationsMetricsCollector | None = None,
    brief_generator: BriefGenerator | None = None,
) -> FastAPI:
    """Build the service; the model loads in the lifespan (startup fails if it cannot).

    Args:
        settings: validated settings.
        collector: metrics collector (default: one on prometheus_client's default registry).
        brief_generator: brief stage (default from ``settings.brief_backend``).
    """
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    store = ExportStore(settings.policy_store_dir())
    collector = collector or OperationsMetricsCollector()
    manager = build_manager(store, settings, collector)
    brief_line = None
    if brief_generator is None and settings.brief_backend is BriefBackend.LLM:
        brief_line = build_brief_line(settings, collector, stopping=lambda: state.shutting_down)
    assert isinstance(manager.observer, CollectorReloadObserver)
    state = ServingState(
        settings=settings,
        store=store,
        collector=collector,
        manager=manager,
        brief=brief_generator or RuleBasedBriefGenerator(),
        brief_line=brief_line,
        observer=manager.observer,
        sync=CurrentSync(
            store,
            manager,
            auto_promote=settings.auto_promote_exports,
            stopping=lambda: state.shutting_down,
        ),
        executor=ThreadPoolExecutor(settings.work_threads, "lf-serve-work"),
        placement=WorkPlacement(limit_s=settings.inline_work_ms / 1000),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        syncs = [state.sync] + ([brief_line.sync] if brief_line else [])
        for sync in syncs:
            info = await asyncio.to_thread(sync.start)
            log.info("serving %s %s from %s", sync.name, info.version, sync.store.location)
        _install_sigterm(state)
        stop = asyncio.Event()
        watchers = (
            [asyncio.create_task(s.watch(stop, settings.reconcile_interval_s)) for s in syncs]
            if settings.watch_current
            else []
        )
        try:
            yield
        finally:
            stop.set()
            for watcher in watchers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(watcher, timeout=5)
            manager.shutdown()
            if brief_line is not None:
                brief_line.manager.shutdown()
            # uvicorn has drained the requests by now; a thread still busy past the graceful
            # timeout is left to end on its own rather than block the exit.
            state.executor.shutdown(wait=False)

    app = FastAPI(title="lightning_fragrance serving", lifespan=lifespan)
    app.state.serving = state
    # Inner to the guard: a long body's wait for admission counts in its latency and metrics.
    app.add_middleware(LongBodyAdmission, paths={"/dna/create"})
    app.add_middleware(RequestGuardMiddleware, state_getter=lambda: state)
    app.add_exception_handler(RequestValidationError, _validation_error)
    _add_routes(app)
    return app


def _install_sigterm(state: ServingState) -> None:
    """SIGTERM: ``/ready`` → 503 now; uvicorn's own shutdown (drain, exit) after a delay."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if state.shutting_down:
            previous(signum, frame)  # a second SIGTERM: no more waiting
            return
        state.shutting_down = True
        delay = state.settings.shutdown_ready_delay_s
        log.info("SIGTERM: /ready now 503; closing the listener in %.1f s", delay)
        loop.call_soon_threadsafe(loop.call_later, delay, previous, signum, None)

    signal.signal(signal.SIGTERM, on_sigterm)


# --------------------------------------------------------------------------- request bodies


async def parse_body(request: Request, model: type[B], *, optional: bool = False) -> B | None:
    """Parse and validate the JSON body with pydantic's own parser; any defect is a 422.

    pydantic-core parses the bytes in one pass and refuses what is not valid JSON text (invalid
    UTF-8, lone surrogates such as ``"\\ud800"``, nesting past its recursion limit) as
    ``json_invalid``. FastAPI's path (``json.loads`` then validation) answered 400 for some of
    these and 500 for others, when its 422 handler could not encode the echoed input (issue 10).

    Raises:
        HTTPException: 422 naming each defect's location and message, never echoing input.
    """
    content_type = request.headers.get("content-type")
    if content_type and not _is_json(content_type):
        # As FastAPI decided before: a body declared as something else is not read as JSON
        # (a browser can send text/plain across origins without asking first).
        detail = f"the body must be JSON: send Content-Type: application/json, not {content_type!r}"
        raise HTTPException(
            422, detail=[{"type": "content_type", "loc": ["header", "content-type"], "msg": detail}]
        )
    raw = await request.body()
    if optional and raw.strip() in (b"", b"null"):
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise HTTPException(422, detail=_describe_errors(exc.errors())) from None


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def _describe_errors(errors: Any) -> list[dict[str, Any]]:
    # Location and message only: the input (which may be huge, NaN, or not encodable) and
    # pydantic's context objects are not echoed back.
    return [
        {
            "type": str(error.get("type", "invalid")),
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "invalid value")),
        }
        for error in errors
    ]


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 for any validation error FastAPI raises itself (query or path parameters)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse({"detail": _describe_errors(errors)}, status_code=422)


def _body_schema(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    # The handlers read the body themselves; this keeps it in the OpenAPI document.
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


# --------------------------------------------------------------------------- routes


async def create_dna(request: Request) -> Response:
    """``POST /dna/create``: brief → policy → formula, with ``X-Model-Version``."""
    state = _state(request)
    body = await parse_body(request, DnaRequest)
    assert body is not None
    limit = state.settings.max_user_text_chars
    if len(body.user_text) > limit:
        raise HTTPException(
            status_code=422,
            detail=f"user_text has {len(body.user_text)} characters; the limit is {limit} "
            "(max_user_text_chars); send a shorter text",
        )
    if state.inflight >= state.settings.max_inflight:
        raise HTTPException(
            status_code=429,
            detail=f"{state.inflight} requests in flight (max_inflight="
            f"{state.settings.max_inflight}); retry shortly",
            headers={"Retry-After": "1"},
        )
    state.inflight += 1
    try:
        llm_brief = await _llm_brief(state, body) if state.brief_line else None
        return await _create_dna(state, body, llm_brief)
    finally:
        state.inflight -= 1


async def _llm_brief(state: ServingState, body: DnaRequest) -> tuple[BriefResult, str]:
    """The brief from the LLM line (batched), with the version that generated it."""
    line = state.brief_line
    assert line is not None
    timeout = state.settings.request_timeout_s
    try:
        with _model_work_errors("brief", timeout):
            brief = await line.generate(body.user_text, body.mode, timeout)
    except BriefError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
    return brief.result, brief.version


@contextlib.contextmanager
def _model_work_errors(what: str, timeout: float) -> Iterator[None]:
    """The answers for model work that could not run, each with what the client can do: 503 +
    Retry-After (its worker was retired past the drain timeout, or no model is loaded yet), 504
    past ``request_timeout_s``."""
    try:
        yield
    except DrainTimeoutExceeded as exc:
        raise HTTPException(
            503, detail=str(exc), headers={"Retry-After": str(exc.retry_after)}
        ) from exc
    except TimeoutError as exc:
        raise HTTPException(504, detail=f"{what} exceeded request_timeout_s={timeout}") from exc
    except NoModelLoaded as exc:
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": "1"}) from exc


async def health() -> dict[str, str]:
    """``GET /health``: liveness, 200 while the process runs."""
    return {"status": "alive"}


async def ready(request: Request) -> JSONResponse:
    """``GET /ready``: 200 while a model serves (degraded included), 503 after SIGTERM."""
    state = _state(request)
    version = state.manager.current_version
    if state.shutting_down or version is None:
        reason = "shutting down" if state.shutting_down else "no model loaded"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)
    fallback = state.sync.fallback
    line = state.brief_line
    lines = _line_syncs(state)
    return JSONResponse(
        {
            "ready": True,
            "version": version,
            "brief_model_version": line.manager.current_version if line else None,
            "reloading": state.manager.reloading,
            # The policy's fallback, as before the brief LLM line existed.
            "degraded": fallback.as_dict() if fallback else None,
            # Every line serving something other than its CURRENT: a degraded brief line
            # still answers (200), but the operator must see it beside the policy's.
            "degraded_models": [sync.name for sync in lines if sync.fallback],
            "models": {
                sync.name: {
                    "version": sync.manager.current_version,
                    "degraded": sync.fallback.as_dict() if sync.fallback else None,
                }
                for sync in lines
            },
            "pid": os.getpid(),  # tells uvicorn workers behind one port apart
        }
    )


def _line_syncs(state: ServingState) -> list[CurrentSync]:
    """The ``CurrentSync`` of every model line this process serves, the policy's first."""
    return [state.sync] + ([state.brief_line.sync] if state.brief_line else [])


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus exposition."""
    state = _state(request)
    return Response(state.collector.exposition(), media_type=state.collector.content_type)


def _line_sync(state: ServingState, model: str | None) -> CurrentSync:
    """The ``CurrentSync`` of the model line named ``model`` (``None`` = the policy).

    Raises:
        HTTPException: 404 naming the lines this process serves.
    """
    if model is None or model == POLICY_MODEL_NAME:
        return state.sync
    if model == BRIEF_MODEL_NAME and state.brief_line is not None:
        return state.brief_line.sync
    lines = [POLICY_MODEL_NAME] + ([BRIEF_MODEL_NAME] if state.brief_line else [])
    hint = (
        "; start lf-serve with brief_backend=llm to serve the brief LLM line"
        if model == BRIEF_MODEL_NAME
        else ""
    )
    detail = f"no model line {model[:64]!r}; this process serves {lines}{hint}"
    raise HTTPException(404, detail=detail)


async def reload_model(request: Request) -> dict[str, Any]:
    """``POST /admin/model/reload``: 202 + reload id; CURRENT follows once it serves."""
    state = _state(request)
    body = await parse_body(request, ReloadRequest, optional=True)
    sync = _line_sync(state, body.model if body else None)
    version = _resolve_version(sync.store, body.version if body else None)
    try:
        record = sync.reload(version)
    except ReloadInProgress as exc:
        raise HTTPException(409, detail=str(exc)) from exc
    return {
        "reload_id": record.reload_id,
        "model": sync.name,
        "version": version,
        "status_url": f"/admin/model/reload/{record.reload_id}",
    }


async def rollback_model(request: Request) -> dict[str, Any]:
    """``POST /admin/model/rollback``: back to the previous version."""
    state = _state(request)
    body = await parse_body(request, RollbackRequest, optional=True)
    sync = _line_sync(state, body.model if body else None)
    try:
        record = sync.rollback()
    except ReloadInProgress as exc:
        raise HTTPException(409, detail=str(exc)) from exc
    except NoPreviousVersion as exc:
        raise HTTPException(409, detail=f"{exc}; reload a named version instead") from exc
    return {
        "reload_id": record.reload_id,
        "model": sync.name,
        "version": record.requested_version,
        "status_url": f"/admin/model/reload/{record.reload_id}",
    }


async def reload_status(reload_id: str, request: Request) -> dict[str, Any]:
    """``GET /admin/model/reload/{reload_id}``: phase, result, error and timings."""
    state = _state(request)
    for sync in _line_syncs(state):
        record = sync.manager.get_reload(reload_id)
        if record is not None:
            return {**record.as_dict(), "model": sync.name}
    raise HTTPException(404, detail=f"no reload {reload_id[:64]!r} in this process")


async def model_info(request: Request) -> dict[str, Any]:
    """``GET /admin/model``: workers, CURRENT, versions, fallback, drain and load counters."""
    state = _state(request)
    standby = state.manager.get_standby_info()
    fallback = state.sync.fallback
    models: dict[str, Any] = {
        POLICY_MODEL_NAME: {
            "current": state.manager.get_current_worker_info().as_dict(),
            "reloading": state.manager.reloading,
            "current_pointer": state.sync.pointer.read(),
            "degraded": fallback.as_dict() if fallback else None,
            "versions": state.store.complete_versions(),
            "drain_timeouts": dict(state.observer.drain_timeouts),
            "abandoned_loads": state.manager.abandoned_loads_total,
            "abandoned_loaders_running": state.manager.abandoned_loaders_running,
        }
    }
    if state.brief_line is not None:
        models[BRIEF_MODEL_NAME] = state.brief_line.admin_info()
    return {
        # The policy's fields stay at the top level, as before the brief LLM line existed.
        "models": models,
        "current": state.manager.get_current_worker_info().as_dict(),
        "standby": standby.as_dict() if standby else None,
        "reloading": state.manager.reloading,
        "current_pointer": state.sync.pointer.read(),
        "degraded": fallback.as_dict() if fallback else None,
        "versions": state.store.complete_versions(),
        "drain_timeouts": dict(state.observer.drain_timeouts),
        "abandoned_loads": state.manager.abandoned_loads_total,
        "abandoned_loaders_running": state.manager.abandoned_loaders_running,
        "work_placement": state.placement.as_dict(),
    }


def _add_routes(app: FastAPI) -> None:
    admin = [Depends(require_admin)]
    app.add_api_route(
        "/dna/create",
        create_dna,
        methods=["POST"],
        responses={200: {"model": DnaResponse}},
        openapi_extra=_body_schema(DnaRequest, required=True),
    )
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route(
        "/admin/model/reload",
        reload_model,
        methods=["POST"],
        status_code=202,
        dependencies=admin,
        openapi_extra=_body_schema(ReloadRequest, required=False),
    )
    app.add_api_route(
        "/admin/model/rollback",
        rollback_model,
        methods=["POST"],
        status_code=202,
        dependencies=admin,
        openapi_extra=_body_schema(RollbackRequest, required=False),
    )
    app.add_api_route(
        "/admin/model/reload/{reload_id}", reload_status, methods=["GET"], dependencies=admin
    )
    app.add_api_route("/admin/model", model_info, methods=["GET"], dependencies=admin)


def _resolve_version(store: ExportStore, requested: str | None) -> str:
    if requested is None:
        newest = store.newest()
        if newest is None:
            raise HTTPException(404, detail=f"no complete export in {store.location}")
        return newest
    try:
        validate_version_name(requested)
        exists = store.has_version(requested)  # refuses a symlinked version too
    except InvalidVersionNameError as exc:
        raise HTTPException(400, detail=str(exc)) from exc
    if not exists:
        raise HTTPException(
            404, detail=f"export {requested!r} not found; available: {store.versions()}"
        )
    return requested


async def _create_dna(
    state: ServingState, body: DnaRequest, llm_brief: tuple[BriefResult, str] | None
) -> Response:
    def work() -> tuple[str, bytes | str, float, str]:
        # The request takes its worker at admission and keeps it for the brief and the policy
        # (research note §6.10: generation pinning); the lease lives with the work, so a
        # request that outlives the HTTP timeout still holds its worker and the drain waits
        # for the real end of the work.
        started = time.perf_counter()
        with state.manager.lease() as lease:
            try:
                result = (
                    llm_brief[0] if llm_brief else state.brief.generate(body.user_text, body.mode)
                )
            except BriefError as exc:
                return lease.version, str(exc), time.perf_counter() - started, ""
            dna = formulate(lease.model.model, result.brief)  # type: ignore[arg-type]
            # One pass of pydantic's Rust serializer, straight to bytes: model_dump +
            # json.dumps took 140 us of the 0.8 ms of work, this takes 30 us.
            payload = DnaResponse(
                version=lease.version,
                brief=result.brief,
                brief_source=result.source.value,
                dna=dna,
            ).model_dump_json()
            elapsed = time.perf_counter() - started
            return lease.version, payload.encode(), elapsed, result.source.value

    placement = state.placement
    timeout = state.settings.request_timeout_s
    with _model_work_errors("request", timeout):
        if placement.next_inline():
            clean = placement.clean()
            version, payload, seconds, source = work()
            placement.observe(seconds, inline=True, clean=clean)
        else:
            job = state.executor.submit(work)
            placement.pool_inflight += 1
            # Counted out when the thread ends, not when this request stops waiting (a timed
            # out request's work still holds the GIL): inline measurements need the pool empty.
            loop = asyncio.get_running_loop()
            job.add_done_callback(lambda _: _call_soon(loop, placement.pool_job_done))
            version, payload, seconds, source = await asyncio.wait_for(
                asyncio.wrap_future(job), timeout=timeout
            )
            placement.observe(seconds, inline=False)
    if isinstance(payload, str):
        raise HTTPException(422, detail=payload)
    headers = {VERSION_HEADER: version, BRIEF_SOURCE_HEADER: source}
    if llm_brief is not None:
        headers[BRIEF_VERSION_HEADER] = llm_brief[1]
    return Response(payload, media_type="application/json", headers=headers)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    # From a pool thread; after shutdown the loop may be closed, and nothing is left to count.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def app_from_environment() -> FastAPI:
    """uvicorn factory for ``--workers N``: settings come from ``LF_SERVE_SETTINGS`` (JSON)."""
    from lightning_fragrance.serving.settings import SETTINGS_ENV

    raw = os.environ.get(SETTINGS_ENV, "{}")
    return create_app(ServeSettings.model_validate_json(raw))
