"""The brief stage of ``/dna/create``: customer text → validated ``Brief``.

Two implementations of one ``BriefGenerator`` protocol:

- ``RuleBasedBriefGenerator`` (the default): the reference task's keyword parser, deterministic
  and sub-millisecond-to-milliseconds on CPU.
- ``LLMBriefGenerator``: any transformers causal-LM directory (Qwen2.5 in production) prompted
  to answer with the brief as JSON. Its answer is extracted, repaired when malformed, validated
  against ``Brief``, and replaced by the rules when it cannot be repaired; every outcome is
  recorded in the LLM brief metrics. One model, loaded once, one request at a time: a
  standalone generator (``create_app(brief_generator=...)``, scripts). The service's LLM path
  with ``brief_backend=llm`` is ``serving.brief_line`` (hot-reloaded, batched), which shares
  the prompt, repair and validation below.

The repair itself is done by ``json-repair`` (a maintained parser that handles far more broken
JSON than a regex could), but it does not report what it fixed, so ``classify_repairs`` looks at
the raw text and names the defects with the metric catalogue's ``RepairType``, the vocabulary of
``llm_brief_repairs_total{repair_type}``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import json_repair
from pydantic import BaseModel, ValidationError

from lightning_fragrance.fragrance import Brief, parse_brief
from lightning_fragrance.monitoring import BriefMode, OperationsMetricsCollector, RepairType

log = logging.getLogger(__name__)


class BriefSource(str, Enum):
    """Which path produced the brief."""

    RULES = "rules"
    LLM = "llm"
    LLM_REPAIRED = "llm_repaired"
    RULES_FALLBACK = "rules_fallback"


# The defects are the metric catalogue's RepairType (one vocabulary for the classifier and
# llm_brief_repairs_total{repair_type}). Severity order: the first kind found is the one counted
# in the metric (one repair_type per brief keeps llm_brief_repairs_total comparable with
# llm_brief_total); JSON_SYNTAX is what json-repair fixed that no named class explains.
_SEVERITY = (
    RepairType.TRUNCATED,
    RepairType.SINGLE_QUOTES,
    RepairType.UNQUOTED_KEYS,
    RepairType.TRAILING_COMMA,
    RepairType.PYTHON_LITERALS,
    RepairType.COMMENTS,
    RepairType.CODE_FENCE,
    RepairType.SURROUNDING_TEXT,
    RepairType.JSON_SYNTAX,
)


@dataclass(frozen=True)
class BriefResult:
    """A brief and how it was obtained."""

    brief: Brief
    source: BriefSource
    repairs: tuple[RepairType, ...] = ()
    raw_output: str | None = None
    error: str | None = None


class BriefGenerator(Protocol):
    """Turns a customer's text into a validated ``Brief``."""

    def generate(self, user_text: str, mode: BriefMode) -> BriefResult:
        """The brief for ``user_text``; ``mode`` picks speed versus variety."""
        ...


class RuleBasedBriefGenerator:
    """The reference task's keyword parser (``lightning_fragrance.fragrance.parse_brief``)."""

    def generate(self, user_text: str, mode: BriefMode) -> BriefResult:
        """Parse ``user_text``; ``mode`` does not change a deterministic parser."""
        return BriefResult(brief=parse_brief(user_text), source=BriefSource.RULES)


# --------------------------------------------------------------------------- extraction + repair

_FENCE_RE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.DOTALL)
_TRAILING_COMMA_RE = re.compile(r",\s*[}\]]")
_SINGLE_QUOTED_RE = re.compile(r"(?:[{,\[:]\s*)'[^'\n]*'")
_UNQUOTED_KEY_RE = re.compile(r"[{,]\s*[A-Za-z_][A-Za-z0-9_]*\s*:")
_PY_LITERAL_RE = re.compile(r":\s*(True|False|None)\b")
_COMMENT_RE = re.compile(r"(^|\s)//|/\*")


def extract_json_candidate(text: str) -> tuple[str, list[RepairType]]:
    """The part of ``text`` that should be the JSON object, and the wrapping defects found."""
    found: list[RepairType] = []
    body = text.strip()
    fence = _FENCE_RE.search(body)
    if fence:
        found.append(RepairType.CODE_FENCE)
        outside = (body[: fence.start()] + body[fence.end() :]).strip()
        if outside:
            found.append(RepairType.SURROUNDING_TEXT)
        body = fence.group(1).strip()
    start = body.find("{")
    if start == -1:
        return body, found
    end = _closing_index(body, start)
    candidate = body[start:] if end is None else body[start : end + 1]
    outside_text = (body[:start] + ("" if end is None else body[end + 1 :])).strip()
    if outside_text and RepairType.SURROUNDING_TEXT not in found:
        found.append(RepairType.SURROUNDING_TEXT)
    return candidate, found


def _closing_index(text: str, start: int) -> int | None:
    """Index of the bracket that closes the one at ``start`` (quote-aware), ``None`` if open."""
    depth = 0
    quote: str | None = None
    escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index
    return None


def _is_truncated(candidate: str) -> bool:
    """True when the object that starts the candidate never closes."""
    return candidate.startswith("{") and _closing_index(candidate, 0) is None


def classify_repairs(raw: str) -> tuple[str, list[RepairType]]:
    """Name every defect of ``raw`` that stops ``json.loads``; return the candidate too.

    An empty list means the extracted candidate is valid JSON as it stands.
    """
    candidate, kinds = extract_json_candidate(raw)
    try:
        json.loads(candidate)
        return candidate, kinds
    except json.JSONDecodeError:
        pass
    checks = (
        (RepairType.TRUNCATED, _is_truncated(candidate)),
        (RepairType.SINGLE_QUOTES, bool(_SINGLE_QUOTED_RE.search(candidate))),
        (RepairType.UNQUOTED_KEYS, bool(_UNQUOTED_KEY_RE.search(candidate))),
        (RepairType.TRAILING_COMMA, bool(_TRAILING_COMMA_RE.search(candidate))),
        (RepairType.PYTHON_LITERALS, bool(_PY_LITERAL_RE.search(candidate))),
        (RepairType.COMMENTS, bool(_COMMENT_RE.search(candidate))),
    )
    syntax = [kind for kind, hit in checks if hit]
    return candidate, kinds + (syntax or [RepairType.JSON_SYNTAX])


def repair_json_object(raw: str) -> tuple[dict[str, Any] | None, list[RepairType]]:
    """Parse the JSON object in ``raw``, repairing it with json-repair when needed.

    Returns:
        The object (``None`` when nothing object-like could be recovered) and the defects.
    """
    candidate, kinds = classify_repairs(raw)
    if not kinds:
        parsed: Any = json.loads(candidate)
    else:
        parsed = json_repair.loads(candidate)
    if not isinstance(parsed, dict) or not parsed:
        return None, kinds
    return parsed, kinds


def primary_repair(kinds: list[RepairType] | tuple[RepairType, ...]) -> RepairType | None:
    """The most severe defect, the one the metric counts."""
    for kind in _SEVERITY:
        if kind in kinds:
            return kind
    return None


# --------------------------------------------------------------------------- LLM generator


@dataclass(frozen=True)
class GenerationSettings:
    """``generate()`` arguments for one mode."""

    max_new_tokens: int
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (sampling knobs only when sampling)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


# fast: greedy and short (the brief JSON is ~150 tokens for Qwen2.5); balanced: mild sampling;
# creative: full-temperature nucleus sampling for more varied profiles.
DEFAULT_MODE_SETTINGS: dict[BriefMode, GenerationSettings] = {
    BriefMode.FAST: GenerationSettings(max_new_tokens=160, do_sample=False),
    BriefMode.BALANCED: GenerationSettings(
        max_new_tokens=256, do_sample=True, temperature=0.7, top_p=0.9
    ),
    BriefMode.CREATIVE: GenerationSettings(
        max_new_tokens=320, do_sample=True, temperature=1.0, top_p=0.95
    ),
}

_SYSTEM_PROMPT = (
    "You are a perfumer's assistant. Turn the customer's request into a fragrance brief. "
    "Answer with one JSON object and nothing else. Keys: profile (family -> weight in [0, 1]; "
    "families: {families}), intensity (one of {intensities}), include_notes, avoid_notes, "
    "avoid_families, mood (one of {moods} or null), season (one of {seasons} or null)."
)


def _enum_values(schema: Mapping[str, Any], name: str) -> str:
    values = schema.get("$defs", {}).get(name, {}).get("enum", [])
    return ", ".join(str(v) for v in values)


def build_system_prompt(brief_model: type[BaseModel] = Brief) -> str:
    """The instruction that asks for the brief as JSON, listing the schema's allowed values."""
    schema = brief_model.model_json_schema()
    return _SYSTEM_PROMPT.format(
        families=_enum_values(schema, "Family"),
        intensities=_enum_values(schema, "Intensity"),
        moods=_enum_values(schema, "Mood"),
        seasons=_enum_values(schema, "Season"),
    )


def build_prompt(tokenizer: Any, system_prompt: str, user_text: str) -> str:
    """The prompt for ``user_text``: the tokenizer's chat template when it has one (the brief
    model trained here renders only the user's message with it), else plain text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": user_text},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    return f"{system_prompt}\nRequest: {user_text}\nJSON:"


def record_llm_result(
    collector: OperationsMetricsCollector, mode: BriefMode, result: BriefResult, seconds: float
) -> None:
    """Record one LLM brief in ``llm_brief_total`` / ``_repairs_total`` / ``_latency_seconds``:
    a rules fallback is a failure repaired by ``rule_fallback``, else the main repair's type."""
    if result.source is BriefSource.RULES_FALLBACK:
        collector.record_llm_brief(
            mode, False, seconds, repaired=True, repair_type=RepairType.RULE_FALLBACK
        )
        return
    record_brief_with_repair(collector, mode, seconds, primary_repair(result.repairs))


@dataclass
class LLMBriefGenerator:
    """Brief extraction with a transformers causal LM, repaired, validated, with a rule fallback.

    Args:
        model_dir: a directory written by ``save_pretrained`` (model and tokenizer).
        collector: where ``llm_brief_total``, ``llm_brief_latency_seconds`` and
            ``llm_brief_repairs_total`` are recorded (``None``: not recorded).
        mode_settings: generation settings per mode (default ``DEFAULT_MODE_SETTINGS``).
        fallback: the generator used when the answer cannot be repaired into a valid brief.
        device: torch device for the model (default ``cpu``).
        seed: if set, seeds torch before each sampled generation (reproducible tests).
    """

    model_dir: str | Path
    collector: OperationsMetricsCollector | None = None
    mode_settings: Mapping[BriefMode, GenerationSettings] = field(
        default_factory=lambda: dict(DEFAULT_MODE_SETTINGS)
    )
    fallback: BriefGenerator = field(default_factory=RuleBasedBriefGenerator)
    device: str = "cpu"
    seed: int | None = None

    def __post_init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(self.model_dir)
        # Local directory only, no remote code: the model files are data, not code (research
        # note §4; the same rule as the policy exports).
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, use_safetensors=True
        )
        self.model = model.to(self.device)
        self.model.eval()
        self.system_prompt = build_system_prompt()
        # generate() is not re-entrant on one model instance; requests queue here.
        self._lock = threading.Lock()

    def prompt(self, user_text: str) -> str:
        """The full prompt: the chat template when the tokenizer has one, else plain text."""
        return build_prompt(self.tokenizer, self.system_prompt, user_text)

    def complete(self, user_text: str, mode: BriefMode) -> str:
        """The model's raw answer for ``user_text`` in ``mode`` (prompt tokens stripped)."""
        import torch

        settings = self.mode_settings[mode]
        inputs = self.tokenizer(self.prompt(user_text), return_tensors="pt").to(self.device)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        kwargs = settings.as_kwargs()
        if self.model.generation_config.eos_token_id is None:
            # A model saved without a generation config would run to max_new_tokens.
            kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        with self._lock, torch.inference_mode():
            if self.seed is not None and settings.do_sample:
                torch.manual_seed(self.seed)
            output = self.model.generate(**inputs, pad_token_id=pad_id, **kwargs)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return str(self.tokenizer.decode(new_tokens, skip_special_tokens=True))

    def generate(self, user_text: str, mode: BriefMode) -> BriefResult:
        """Ask the LLM, repair and validate; fall back to the rules when that fails."""
        mode = BriefMode(mode)
        start = time.perf_counter()
        raw = self.complete(user_text, mode)
        result = interpret_llm_output(raw, user_text, mode, self.fallback)
        self._record(mode, result, time.perf_counter() - start)
        return result

    def _record(self, mode: BriefMode, result: BriefResult, seconds: float) -> None:
        if self.collector is not None:
            record_llm_result(self.collector, mode, result, seconds)


def record_brief_with_repair(
    collector: OperationsMetricsCollector,
    mode: BriefMode,
    seconds: float,
    kind: RepairType | None,
) -> None:
    """Record a successful LLM brief, labelling the repair with the classifier's type."""
    if kind is None:
        collector.record_llm_brief(mode, True, seconds)
    else:
        collector.record_llm_brief(mode, True, seconds, repaired=True, repair_type=kind)


def interpret_llm_output(
    raw: str,
    user_text: str,
    mode: BriefMode,
    fallback: BriefGenerator,
    brief_model: Callable[[dict[str, Any]], Brief] = Brief.model_validate,
) -> BriefResult:
    """Turn an LLM answer into a ``BriefResult``: parse, repair, validate, or fall back."""
    obj, kinds = repair_json_object(raw)
    error: str | None = None
    if obj is None:
        error = "no JSON object in the answer"
    else:
        try:
            brief = brief_model(obj)
        except ValidationError as exc:
            error = f"answer does not fit the Brief schema: {exc.error_count()} errors"
        else:
            source = BriefSource.LLM_REPAIRED if kinds else BriefSource.LLM
            return BriefResult(brief=brief, source=source, repairs=tuple(kinds), raw_output=raw)
    log.warning("LLM brief unusable (%s); falling back to rules", error)
    fallback_result = fallback.generate(user_text, mode)
    return BriefResult(
        brief=fallback_result.brief,
        source=BriefSource.RULES_FALLBACK,
        repairs=tuple(kinds),
        raw_output=raw,
        error=error,
    )
