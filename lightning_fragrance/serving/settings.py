"""Settings of the serving process (``configs/serve.yaml``, ``lf-serve``), validated once."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from lightning_fragrance.monitoring import BriefMode
from lightning_fragrance.serving.brief import GenerationSettings
from lightning_fragrance.serving.hot_reload import DrainTimeoutAction
from lightning_fragrance.serving.loading import is_store_url

ADMIN_TOKEN_ENV = "LF_ADMIN_TOKEN"
SETTINGS_ENV = "LF_SERVE_SETTINGS"


# The brief LLM line's exports live in their own store beside the policy's (one CURRENT each).
BRIEF_LLM_STORE = "brief_llm"
# A policy store may sit in ``<export_dir>/policy`` (the ``exports/<model>/<version>/``
# layout); without that folder, the versions directly in ``export_dir`` are read in place.
POLICY_STORE = "policy"


def _store_location(value: Any) -> Path | str:
    # A URL stays a string: Path("s3://bucket/exports") would collapse it to "s3:/bucket/...".
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value:
        return value if is_store_url(value) else Path(value)
    raise ValueError(f"expected a directory or a URL such as s3://bucket/exports, got {value!r}")


# An export store: a local directory (a Path) or an fsspec URL such as ``s3://bucket/exports``.
StoreLocation = Annotated[Path | str, PlainValidator(_store_location)]


def _join(location: Path | str, name: str) -> Path | str:
    if isinstance(location, Path):
        return location / name
    return f"{location.rstrip('/')}/{name}"


def _default_llm_decoding() -> dict[BriefMode, GenerationSettings]:
    from lightning_fragrance.serving.brief_line import DEFAULT_LLM_DECODING

    return dict(DEFAULT_LLM_DECODING)


class BriefBackend(str, Enum):
    """Which brief generator ``/dna/create`` uses."""

    RULES = "rules"
    LLM = "llm"


class ServeSettings(BaseModel):
    """Everything ``lf-serve`` can configure; defaults are the safe ones.

    Attributes:
        export_dir: the export store (``lf-export`` output); ``CURRENT`` inside it is watched.
            A URL (``s3://bucket/exports``) serves from an object store: versions are
            downloaded into a private cache and verified, and ``CURRENT`` is polled every
            ``reconcile_interval_s`` (endpoint and credentials: the ``AWS_*`` environment
            variables; docs/serving.md, "Exports on an object store (S3)").
        host: bind address; loopback unless you mean to expose the service.
        port: TCP port.
        workers: uvicorn worker processes; they converge through ``CURRENT``.
        admin_token: bearer token of the admin routes; ``LF_ADMIN_TOKEN`` overrides it. With no
            token the admin routes answer 403.
        warmup_steps: warm-up calls before a new model takes traffic.
        load_timeout_s: seconds the policy line's loader may take; past it the reload fails
            as ``load_failed`` and the next may start (the loader thread, which cannot be
            stopped, is abandoned and counted). The policy loads in well under a second; the
            deadline bounds an export that never ends (a FIFO, a hung network mount).
        drain_timeout_s: seconds the old worker gets to finish its requests.
        drain_timeout_action: ``leave_running`` or ``reject`` (503 + Retry-After).
        keep_previous_s: keep the previous model warm this long for an instant rollback.
        revert_error_rate: error rate of the new model that reverts to the kept one.
        revert_min_requests: requests before the error rate counts.
        max_inflight: concurrent ``/dna/create`` requests per process; more get 429.
        request_timeout_s: a ``/dna/create`` slower than this gets 504.
        max_body_bytes: larger request bodies get 422.
        max_user_text_chars: a longer ``user_text`` gets 422.
        watch_current: reload when ``CURRENT`` changes (multi-worker / multi-replica sync).
        auto_promote_exports: point ``CURRENT`` at every new complete export by itself.
        reconcile_interval_s: also re-read ``CURRENT`` this often (file events can be missed
            on network filesystems). On an object store this is the poll interval: every
            replica starts its reload at most one interval (plus one read of ``CURRENT``)
            after ``CURRENT`` changed, and serves the new version once that reload finished.
        shutdown_ready_delay_s: after SIGTERM, ``/ready`` answers 503 this long before the
            listener closes, so load balancers stop sending traffic first.
        graceful_shutdown_s: then in-flight requests get this long to finish.
        worker_healthcheck_s: with ``workers`` > 1, uvicorn's supervisor kills and restarts a
            worker that does not answer its health ping within this time. uvicorn's 5 s default
            is shorter than a worker importing torch and loading its model takes on a busy
            machine, which then restarts workers in a loop.
        brief_backend: ``rules`` (default) or ``llm``: the brief LLM line, hot-reloaded from
            ``llm_export_dir`` like the policy.
        llm_export_dir: the brief LLM's export store (default ``<export_dir>/brief_llm``, what
            ``lf-export`` writes for it), with its own ``CURRENT``.
        llm_warmup_steps: warm-up ``generate`` calls before a new brief model takes traffic.
        llm_load_timeout_s: seconds the brief LLM's loader may take (verify + from_pretrained).
        llm_max_batch_size: most concurrent requests in one batched ``generate``.
        llm_batch_wait_ms: longest a request waits for others to join its batch.
        llm_decoding: generation settings per mode (``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_p``).
        work_threads: threads running the brief + policy work of ``/dna/create`` per process
            (a slow request holds one; more than a few only contend for the GIL).
        inline_work_ms: ``/dna/create`` work measured faster than this runs on the event loop
            instead of the pool: no thread hand-off, half the CPU per request (see
            ``serving.placement``; 0 = always the pool). Keep it small: inline work delays
            every other request of the process by as much, and the request timeout does not
            apply to it.
        torch_threads: torch intra-op threads per process (0 = torch's default). One suits
            the small policies: requests already run concurrently, and with 2 threads a
            ``/dna/create`` took 1.4 ms of CPU instead of 0.8 ms (2-core machine).
    """

    model_config = ConfigDict(extra="forbid")

    export_dir: StoreLocation = Path("exports")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    admin_token: str | None = None
    warmup_steps: int = Field(default=5, ge=0)
    load_timeout_s: float = Field(default=60.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    drain_timeout_action: DrainTimeoutAction = DrainTimeoutAction.REJECT
    keep_previous_s: float = Field(default=0.0, ge=0)
    revert_error_rate: float | None = Field(default=0.5, gt=0, le=1)
    revert_min_requests: int = Field(default=20, ge=1)
    max_inflight: int = Field(default=64, ge=1)
    torch_threads: int = Field(default=1, ge=0)
    work_threads: int = Field(default=4, ge=1)
    inline_work_ms: float = Field(default=5.0, ge=0)
    request_timeout_s: float = Field(default=10.0, gt=0)
    max_body_bytes: int = Field(default=16_384, ge=64)
    max_user_text_chars: int = Field(default=2_000, ge=1)
    watch_current: bool = True
    auto_promote_exports: bool = False
    reconcile_interval_s: float = Field(default=2.0, gt=0)
    shutdown_ready_delay_s: float = Field(default=1.0, ge=0)
    graceful_shutdown_s: float = Field(default=30.0, ge=0)
    worker_healthcheck_s: int = Field(default=30, ge=1)
    brief_backend: BriefBackend = BriefBackend.RULES
    llm_export_dir: StoreLocation | None = None
    llm_warmup_steps: int = Field(default=1, ge=0)
    llm_load_timeout_s: float = Field(default=300.0, gt=0)
    llm_max_batch_size: int = Field(default=8, ge=1)
    llm_batch_wait_ms: float = Field(default=10.0, ge=0)
    llm_decoding: dict[BriefMode, GenerationSettings] = Field(default_factory=_default_llm_decoding)

    def policy_store_dir(self) -> Path | str:
        """The policy line's store: ``<export_dir>/policy`` if present, else ``export_dir``.

        On an object store the versions are read in ``export_dir`` itself (a prefix cannot
        be told "present" before something was uploaded under it).
        """
        if not isinstance(self.export_dir, Path):
            return self.export_dir
        nested = self.export_dir / POLICY_STORE
        return nested if nested.is_dir() else self.export_dir

    def brief_llm_store_dir(self) -> Path | str:
        """The brief LLM line's store (``llm_export_dir``, else ``<export_dir>/brief_llm``)."""
        return self.llm_export_dir or _join(self.export_dir, BRIEF_LLM_STORE)

    def resolved_admin_token(self) -> str | None:
        """The admin token: the environment first, then the config; empty means none."""
        token = os.environ.get(ADMIN_TOKEN_ENV) or self.admin_token
        return token or None
