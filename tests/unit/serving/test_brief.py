"""The brief stage: repair classification on malformed answers, and the LLM path end to end.

The LLM tests build a tiny Qwen2-architecture model and a word-level tokenizer here, save them
with ``save_pretrained`` and load them back through ``from_pretrained(path)``, the production
code path. One model has random weights (its answer is garbage: the rule fallback must take
over); the other is "scripted": one-hot embeddings, zeroed attention/MLP outputs and an lm_head
that maps each token to the next token of a fixed answer, so greedy decoding reproduces a known
malformed JSON answer through the real ``generate``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from tokenizers import AddedToken, ByteLevelBPETokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from lightning_fragrance.fragrance import Intensity, Mood, Season, parse_brief
from lightning_fragrance.fragrance.catalog import Family
from lightning_fragrance.monitoring import BriefMode, OperationsMetricsCollector, RepairType
from lightning_fragrance.serving.brief import (
    BriefSource,
    GenerationSettings,
    LLMBriefGenerator,
    RuleBasedBriefGenerator,
    build_system_prompt,
    classify_repairs,
    interpret_llm_output,
    primary_repair,
    record_brief_with_repair,
    repair_json_object,
)

VALID = {"profile": {"citrus": 0.9, "woody": 0.4}, "intensity": "edt", "season": "summer"}

# (raw answer, defects we must name, the object it must repair to)
CORPUS: list[tuple[str, set[RepairType], dict[str, object]]] = [
    (
        '{"profile": {"citrus": 0.9, "woody": 0.4}, "intensity": "edt", "season": "summer"}',
        set(),
        VALID,
    ),
    (
        '```json\n{"profile": {"citrus": 0.9, "woody": 0.4}, "intensity": "edt", '
        '"season": "summer"}\n```',
        {RepairType.CODE_FENCE},
        VALID,
    ),
    (
        'Here is the brief:\n```\n{"profile": {"citrus": 0.9, "woody": 0.4}, "intensity": "edt", '
        '"season": "summer"}\n```\nEnjoy!',
        {RepairType.CODE_FENCE, RepairType.SURROUNDING_TEXT},
        VALID,
    ),
    (
        '{"profile": {"citrus": 0.9, "woody": 0.4,}, "intensity": "edt", "season": "summer",}',
        {RepairType.TRAILING_COMMA},
        VALID,
    ),
    (
        "{'profile': {'citrus': 0.9, 'woody': 0.4}, 'intensity': 'edt', 'season': 'summer'}",
        {RepairType.SINGLE_QUOTES},
        VALID,
    ),
    (
        '{"profile": {"citrus": 0.9, "woody": 0.4}, "intensity": "edt", "season": "summer"',
        {RepairType.TRUNCATED},
        VALID,
    ),
    (
        '{"profile": {"citrus": 0.9, "woody": 0.4}, "intensity": "edt", "season": "summ',
        {RepairType.TRUNCATED},
        {"profile": {"citrus": 0.9, "woody": 0.4}, "intensity": "edt", "season": "summ"},
    ),
    (
        '{profile: {"citrus": 0.9, "woody": 0.4}, intensity: "edt", season: "summer"}',
        {RepairType.UNQUOTED_KEYS},
        VALID,
    ),
    (
        'Sure! {"profile": {"citrus": 0.9, "woody": 0.4}, "intensity": "edt", "season": "summer"}',
        {RepairType.SURROUNDING_TEXT},
        VALID,
    ),
    (
        '{"profile": {"citrus": 0.9, "woody": 0.4}, "intensity": "edt", "season": "summer", '
        '"mood": None}',
        {RepairType.PYTHON_LITERALS},
        {**VALID, "mood": None},
    ),
]


@pytest.mark.parametrize(("raw", "kinds", "expected"), CORPUS)
def test_repair_names_each_defect_and_recovers_the_object(
    raw: str, kinds: set[RepairType], expected: dict[str, object]
) -> None:
    _, found = classify_repairs(raw)
    assert set(found) == kinds
    obj, _ = repair_json_object(raw)
    assert obj == expected


def test_an_answer_without_any_object_is_unrecoverable() -> None:
    obj, kinds = repair_json_object("I cannot help with that request.")
    assert obj is None
    assert kinds == [RepairType.JSON_SYNTAX]


def test_primary_repair_prefers_truncation_over_wrapping() -> None:
    assert primary_repair([RepairType.CODE_FENCE, RepairType.TRUNCATED]) is RepairType.TRUNCATED
    assert primary_repair([]) is None


@pytest.mark.parametrize(("raw", "kinds", "expected"), [case for case in CORPUS if case[1]])
def test_the_metric_counts_the_classifiers_own_repair_type(
    raw: str, kinds: set[RepairType], expected: dict[str, object]
) -> None:
    collector = _collector()
    _, found = classify_repairs(raw)
    kind = primary_repair(found)
    assert kind is not None
    record_brief_with_repair(collector, BriefMode.BALANCED, 0.1, kind)
    labels = {"mode": "balanced", "repair_type": kind.value}
    assert collector.registry.get_sample_value("llm_brief_repairs_total", labels) == 1.0


@pytest.mark.parametrize(
    "name",
    [
        "truncated",
        "single_quotes",
        "unquoted_keys",
        "trailing_comma",
        "python_literals",
        "comments",
        "code_fence",
        "surrounding_text",
    ],
)
def test_each_syntax_repair_class_is_a_label_of_its_own(name: str) -> None:
    collector = _collector()
    record_brief_with_repair(collector, BriefMode.FAST, 0.1, RepairType(name))
    for repair_type in (name, "json_syntax"):
        labels = {"mode": "fast", "repair_type": repair_type}
        expected = 1.0 if repair_type == name else 0.0
        assert collector.registry.get_sample_value("llm_brief_repairs_total", labels) == expected


def test_schema_violations_fall_back_to_the_rules_with_the_reason() -> None:
    text = "fresh citrus for summer"
    result = interpret_llm_output(
        '{"profile": {"citrus": 7.0}}', text, BriefMode.FAST, RuleBasedBriefGenerator()
    )
    assert result.source is BriefSource.RULES_FALLBACK
    assert result.error is not None and "Brief schema" in result.error
    assert result.brief == parse_brief(text)


def test_the_prompt_lists_every_value_the_brief_schema_allows() -> None:
    prompt = build_system_prompt()
    for enum in (Family, Intensity, Mood, Season):
        for member in enum:
            assert member.value in prompt, (enum.__name__, member.value)


def test_rule_based_generator_returns_the_reference_parser_brief() -> None:
    result = RuleBasedBriefGenerator().generate("a warm amber scent", BriefMode.BALANCED)
    assert result.source is BriefSource.RULES
    assert result.brief == parse_brief("a warm amber scent")


# ----------------------------------------------------------------------------- tiny LLMs

# The scripted answer, one token per word: single quotes and trailing commas on purpose.
SCRIPT = ["{", "'profile':", "{'citrus':", "0.9,", "'woody':", "0.4,},"]
SCRIPT += ["'intensity':", "'edt',", "'season':", "'summer',", "}"]
CORPUS_TEXT = ["a fresh citrus scent for summer, not too sweet", "Request: JSON: woody amber"]


def _tokenizer(directory: Path) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer trained here, plus one added token per script word."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS_TEXT * 5, vocab_size=280, min_frequency=1, show_progress=False)
    files = bpe.save_model(str(directory))
    tokenizer = Qwen2Tokenizer(vocab=files[0], merges=files[1])
    tokenizer.add_tokens([AddedToken(word + " ", normalized=False) for word in SCRIPT])
    tokenizer.save_pretrained(directory)
    return tokenizer


def _model(vocab_size: int, hidden_size: int = 32) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="module")
def random_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("random-qwen2")
    tokenizer = _tokenizer(directory)
    _model(len(tokenizer)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def scripted_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("scripted-qwen2")
    tokenizer = _tokenizer(directory)
    vocab_size = len(tokenizer)
    model = _model(vocab_size, hidden_size=vocab_size + (-vocab_size % 8))
    # The token the prompt ends with (":" of "JSON:") starts the chain, EOS ends it.
    prompt_end = tokenizer("Request: x\nJSON:")["input_ids"][-1]
    chain = [prompt_end, *tokenizer.convert_tokens_to_ids([w + " " for w in SCRIPT])]
    chain.append(tokenizer.eos_token_id)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab_size, model.config.hidden_size))
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for current, following in itertools.pairwise(chain):
            model.lm_head.weight[following, current] = 10.0
    model.save_pretrained(directory)
    return directory


def _collector() -> OperationsMetricsCollector:
    return OperationsMetricsCollector(registry=CollectorRegistry())


def _sample(collector: OperationsMetricsCollector, name: str, **labels: str) -> float:
    value = collector.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_scripted_llm_answer_is_repaired_validated_and_counted(scripted_llm_dir: Path) -> None:
    collector = _collector()
    generator = LLMBriefGenerator(scripted_llm_dir, collector=collector)
    result = generator.generate("a fresh citrus scent for summer", BriefMode.FAST)
    assert result.source is BriefSource.LLM_REPAIRED
    assert {RepairType.SINGLE_QUOTES, RepairType.TRAILING_COMMA} <= set(result.repairs)
    assert result.brief.profile[Family.CITRUS] == 0.9
    assert result.brief.intensity.value == "edt"
    assert _sample(collector, "llm_brief_total", mode="fast", status="success") == 1.0
    # The most severe defect, under its own name (not folded into json_syntax).
    assert _sample(collector, "llm_brief_repairs_total", mode="fast", repair_type="single_quotes")
    assert (
        _sample(collector, "llm_brief_repairs_total", mode="fast", repair_type="json_syntax") == 0
    )


def test_a_short_generation_budget_truncates_and_the_repair_closes_the_object(
    scripted_llm_dir: Path,
) -> None:
    settings = {mode: GenerationSettings(max_new_tokens=6, do_sample=False) for mode in BriefMode}
    generator = LLMBriefGenerator(scripted_llm_dir, mode_settings=settings)
    result = generator.generate("citrus", BriefMode.FAST)
    assert RepairType.TRUNCATED in result.repairs
    assert result.source is BriefSource.LLM_REPAIRED
    assert result.brief.profile[Family.WOODY] == 0.4


def test_creative_mode_samples_and_still_yields_a_valid_brief(scripted_llm_dir: Path) -> None:
    generator = LLMBriefGenerator(scripted_llm_dir, seed=3)
    assert generator.mode_settings[BriefMode.CREATIVE].do_sample is True
    assert generator.mode_settings[BriefMode.FAST].do_sample is False
    result = generator.generate("citrus", BriefMode.CREATIVE)
    # top_p=0.95 keeps only the scripted token (98.7 % of the mass), so sampling follows it.
    assert result.source is BriefSource.LLM_REPAIRED
    assert result.brief.season is not None and result.brief.season.value == "summer"


def test_random_llm_garbage_falls_back_to_the_rules_and_is_counted(random_llm_dir: Path) -> None:
    collector = _collector()
    settings = {mode: GenerationSettings(max_new_tokens=12, do_sample=False) for mode in BriefMode}
    generator = LLMBriefGenerator(random_llm_dir, collector=collector, mode_settings=settings)
    text = "a warm woody scent for winter"
    result = generator.generate(text, BriefMode.BALANCED)
    assert result.source is BriefSource.RULES_FALLBACK
    assert result.brief == parse_brief(text)
    assert result.raw_output is not None
    assert _sample(collector, "llm_brief_total", mode="balanced", status="failure") == 1.0
    assert (
        _sample(collector, "llm_brief_repairs_total", mode="balanced", repair_type="rule_fallback")
        == 1.0
    )
