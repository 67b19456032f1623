"""The brief LLM as a second model line: its own exports, ``CURRENT``, reloads and version.

The operations guide's scenario 2 (Qwen2.5 v1 -> v2: load, warm up with ``generate``, switch,
drain, stop) runs through a ``HotReloadManager`` of its own, beside the policy's, and a
``CurrentSync`` over ``exports/brief_llm/`` (one ``CURRENT`` per model line). Each loaded
version (``BriefLLMModel``) owns a ``GenerationBatcher``: concurrent ``/dna/create`` requests
share one batched ``generate`` per mode, and a batch never mixes versions.

A request leases the serving version when it is admitted and gives it back when its answer is
generated (not when the HTTP handler stops waiting), so a reload's drain waits for every
``generate`` still running on the old version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from lightning_fragrance.llm.export import DEFAULT_MODEL_NAME, LoadedBriefModel, load_brief_export
from lightning_fragrance.llm.generation import decode_answers
from lightning_fragrance.monitoring import BriefMode, OperationsMetricsCollector
from lightning_fragrance.serving.batching import GenerationBatcher
from lightning_fragrance.serving.brief import (
    BriefGenerator,
    BriefResult,
    GenerationSettings,
    RuleBasedBriefGenerator,
    build_prompt,
    build_system_prompt,
    interpret_llm_output,
    record_llm_result,
)
from lightning_fragrance.serving.current_sync import CurrentSync
from lightning_fragrance.serving.hot_reload import HotReloadManager, ReloadObserver
from lightning_fragrance.serving.loading import ExportNotFoundError, ExportStore

log = logging.getLogger(__name__)

# "brief_llm": the line's name in the admin API and its `model` metric label (ModelLine).
BRIEF_MODEL_NAME = DEFAULT_MODEL_NAME
WARMUP_TEXT = "a fresh citrus scent for summer, not too sweet"
CLOSE_WAIT_S = 30.0
"""How long retiring a brief model waits for its batch in flight (a drained reload has none; a
shutdown may have one whose request already timed out). As uvicorn's graceful shutdown."""

# Decoding per mode for the brief model trained here (its answers are at most ~96 tokens):
# fast = greedy (deterministic, the shortest budget), balanced = mild nucleus sampling,
# creative = full-temperature sampling with a little more room. docs/serving.md lists them.
DEFAULT_LLM_DECODING: dict[BriefMode, GenerationSettings] = {
    BriefMode.FAST: GenerationSettings(max_new_tokens=96, do_sample=False),
    BriefMode.BALANCED: GenerationSettings(
        max_new_tokens=112, do_sample=True, temperature=0.7, top_p=0.9
    ),
    BriefMode.CREATIVE: GenerationSettings(
        max_new_tokens=128, do_sample=True, temperature=1.0, top_p=0.95
    ),
}


class BriefLLMModel:
    """One loaded version of the brief LLM and the batcher that feeds it.

    Args:
        loaded: the verified export (model, tokenizer, version).
        decoding: generation settings per mode.
        max_batch_size: most requests in one ``generate``.
        max_wait_s: longest a request waits for others to join its batch.
    """

    def __init__(
        self,
        loaded: LoadedBriefModel,
        decoding: Mapping[BriefMode, GenerationSettings],
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
    ) -> None:
        self.model = loaded.model  # the nn.Module: the manager's validation reads its weights
        self.tokenizer = loaded.tokenizer
        self.version = loaded.version
        self.decoding = dict(decoding)
        self.system_prompt = build_system_prompt()
        # Decoder-only models generate after the last column: pad on the left.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batcher = GenerationBatcher(
            self.generate_batch,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            name=f"lf-generate-{self.version}",
        )

    def generate_batch(self, texts: list[str], mode: BriefMode) -> list[str]:
        """The raw answers for ``texts`` in ``mode``, from one ``model.generate`` call."""
        output, prompt_length = self._generate(texts, mode)
        return decode_answers(self.tokenizer, output, prompt_length)

    def generate_ids(self, texts: list[str], mode: BriefMode) -> list[list[int]]:
        """The generated token ids of each of ``texts`` (end token and padding after it
        included), from one ``model.generate`` call: how long answers are, in tokens."""
        output, prompt_length = self._generate(texts, mode)
        return [row[prompt_length:].tolist() for row in output]

    def _generate(self, texts: list[str], mode: BriefMode) -> tuple[torch.Tensor, int]:
        settings = self.decoding[BriefMode(mode)]
        prompts = [build_prompt(self.tokenizer, self.system_prompt, t) for t in texts]
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **settings.as_kwargs(),
            )
        return output, int(inputs["input_ids"].shape[1])

    def close(self) -> None:
        """The manager retired this version: answer what is queued, then free the thread once
        the batch in flight is generated (at most `CLOSE_WAIT_S`)."""
        self.batcher.close(wait_s=CLOSE_WAIT_S)


def brief_llm_warmup(model: BriefLLMModel) -> torch.Tensor:
    """One warm-up step: a real greedy ``generate`` (the guide's warm-up), short answer.

    Returns the last logits of the prompt so the manager refuses a model that computes NaN.
    """
    inputs = model.tokenizer(
        [build_prompt(model.tokenizer, model.system_prompt, WARMUP_TEXT)],
        return_tensors="pt",
        add_special_tokens=False,
    )
    with torch.inference_mode():
        model.model.generate(
            **inputs,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
            eos_token_id=model.tokenizer.eos_token_id,
        )
        logits: torch.Tensor = model.model(**inputs).logits[:, -1]
    return logits


@dataclass(frozen=True)
class BriefLLMSettings:
    """What the brief LLM line needs from ``ServeSettings`` (kept apart for tests)."""

    decoding: Mapping[BriefMode, GenerationSettings]
    warmup_steps: int = 1
    load_timeout_s: float | None = 300.0
    drain_timeout_s: float = 30.0
    drain_timeout_action: str = "reject"
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    auto_promote: bool = False


@dataclass(frozen=True)
class LLMBrief:
    """A brief from the LLM line and the version that generated it."""

    result: BriefResult
    version: str


class BriefLLMLine:
    """The brief LLM model line: manager, ``CURRENT`` follower, batched generation, metrics.

    Args:
        store: the line's export store (``exports/brief_llm``).
        settings: the line's settings.
        collector: where ``llm_brief_*`` are recorded (``None``: nowhere).
        observer: the manager's reload observer.
        stopping: True once the process shuts down.
        fallback: the brief generator used when an answer is not a valid brief.
    """

    name = BRIEF_MODEL_NAME

    def __init__(
        self,
        store: ExportStore,
        settings: BriefLLMSettings,
        *,
        collector: OperationsMetricsCollector | None = None,
        observer: ReloadObserver | None = None,
        stopping: Callable[[], bool] = lambda: False,
        fallback: BriefGenerator | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.collector = collector
        self.fallback: BriefGenerator = fallback or RuleBasedBriefGenerator()
        self.manager: HotReloadManager[BriefLLMModel] = HotReloadManager(
            self._load,
            warmup_func=brief_llm_warmup,
            warmup_steps=settings.warmup_steps,
            drain_timeout=settings.drain_timeout_s,
            drain_timeout_action=settings.drain_timeout_action,
            # No warm standby: a second copy of an LLM for a rollback window is memory the
            # guide's 2x reload bound does not have room for; a rollback reloads.
            keep_previous_s=0.0,
            revert_error_rate=None,
            observer=observer,
            load_timeout=settings.load_timeout_s,
        )
        self.sync = CurrentSync(
            store,
            self.manager,
            name=self.name,
            auto_promote=settings.auto_promote,
            stopping=stopping,
        )

    def _load(self, version: str | None) -> BriefLLMModel:
        name = version or self.store.current() or self.store.newest()
        if name is None:
            raise ExportNotFoundError(
                f"no complete brief model export in {self.store.location}; train and export one "
                "(`lf-train task=brief_llm`, then `lf-export`)"
            )
        loaded = load_brief_export(self.store.fetch(name))  # an object store downloads it
        return BriefLLMModel(
            loaded,
            self.settings.decoding,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.batch_wait_s,
        )

    def submit(self, user_text: str, mode: BriefMode) -> Future[tuple[str, str]]:
        """Queue ``user_text`` on the serving version; the future holds (raw answer, version).

        The version's lease is given back when the answer exists, on the generation thread, so
        the drain of a reload waits for it even if the HTTP request stopped waiting.

        Raises:
            NoModelLoaded: before the first version serves.
        """
        lease_cm = self.manager.lease()
        lease = lease_cm.__enter__()
        version = lease.version
        try:
            inner = lease.model.batcher.submit(user_text, mode)
        except BaseException as exc:
            lease_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        # `finish` holds the version's name, never the model: once the lease is given back
        # nothing here keeps a retired model alive (or its stop would need a full GC pass).
        del lease
        outer: Future[tuple[str, str]] = Future()
        # Running from the start: a request that times out cannot cancel it, so the answer
        # that arrives later is set without an InvalidStateError (the generate is not undone).
        outer.set_running_or_notify_cancel()

        def finish(done: Future[str]) -> None:
            error = done.exception()
            try:
                if error is None:
                    lease_cm.__exit__(None, None, None)
                else:
                    lease_cm.__exit__(type(error), error, error.__traceback__)
            except BaseException as exc:  # DrainTimeoutExceeded: the answer is withheld
                outer.set_exception(exc)
                return
            if error is not None:
                outer.set_exception(error)
            else:
                outer.set_result((done.result(), version))

        inner.add_done_callback(finish)
        return outer

    async def generate(self, user_text: str, mode: BriefMode, timeout_s: float) -> LLMBrief:
        """The brief for ``user_text``: batched generation, then repair, validation, fallback.

        Raises:
            TimeoutError: no answer within ``timeout_s``.
            NoModelLoaded, DrainTimeoutExceeded: as the manager raises them.
            BriefError: the rules fallback cannot read the text either.
        """
        mode = BriefMode(mode)
        start = time.perf_counter()
        raw, version = await asyncio.wait_for(
            asyncio.wrap_future(self.submit(user_text, mode)), timeout=timeout_s
        )
        result = interpret_llm_output(raw, user_text, mode, self.fallback)
        if self.collector is not None:
            record_llm_result(self.collector, mode, result, time.perf_counter() - start)
        return LLMBrief(result, version)

    def admin_info(self) -> dict[str, Any]:
        """The line's part of ``GET /admin/model``."""
        current = self.manager.get_current_worker_info() if self.manager.current_version else None
        fallback = self.sync.fallback
        drain_timeouts = getattr(self.manager.observer, "drain_timeouts", {})
        return {
            "current": current.as_dict() if current else None,
            "drain_timeouts": dict(drain_timeouts),
            "abandoned_loads": self.manager.abandoned_loads_total,
            "abandoned_loaders_running": self.manager.abandoned_loaders_running,
            "reloading": self.manager.reloading,
            "current_pointer": self.sync.pointer.read(),
            "degraded": fallback.as_dict() if fallback else None,
            "versions": self.store.complete_versions(),
            "batching": {
                "max_batch_size": self.settings.max_batch_size,
                "batch_wait_s": self.settings.batch_wait_s,
            },
        }


__all__ = [
    "BRIEF_MODEL_NAME",
    "DEFAULT_LLM_DECODING",
    "BriefLLMLine",
    "BriefLLMModel",
    "BriefLLMSettings",
    "LLMBrief",
    "brief_llm_warmup",
]
