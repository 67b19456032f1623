"""The SFT stage writes a model directory that transformers loads and that generates."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_fragrance.llm.data import generate_examples
from lightning_fragrance.llm.generation import generate_answers
from lightning_fragrance.llm.sft import IGNORE_INDEX, SFTResult, collate_sft, encode_example


def test_sft_writes_a_qwen2_directory_that_auto_classes_load(tiny_sft: SFTResult) -> None:
    config = json.loads((tiny_sft.model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert (tiny_sft.model_dir / "model.safetensors").is_file()
    assert (tiny_sft.model_dir / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_sft.model_dir), use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_sft.model_dir))
    assert model.config.vocab_size == len(tokenizer)
    assert tiny_sft.steps > 0 and torch.isfinite(torch.tensor(tiny_sft.best_val_loss))


def test_only_the_answer_tokens_are_learned(tiny_sft_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_sft_dir))
    encoded = [encode_example(tokenizer, e) for e in generate_examples(3, seed=0)]
    batch = collate_sft(encoded, tokenizer.pad_token_id)
    for row, (ids, n_prompt) in enumerate(encoded):
        assert (batch["labels"][row, :n_prompt] == IGNORE_INDEX).all()
        assert batch["labels"][row, len(ids) - 1] == tokenizer.eos_token_id
        assert (batch["labels"][row, len(ids) :] == IGNORE_INDEX).all()


def test_batched_greedy_answers_equal_one_at_a_time_answers(tiny_sft_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_sft_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_sft_dir))
    texts = ["fresh citrus, not too sweet", "포근한 겨울 바닐라 향수", "rose"]
    batched = generate_answers(model, tokenizer, texts, batch_size=3, max_new_tokens=12)
    single = [generate_answers(model, tokenizer, [t], max_new_tokens=12)[0] for t in texts]
    assert batched == single
