"""The corpus-trained tokenizer, saved and loaded through transformers."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from lightning_fragrance.llm.data import brief_to_json, generate_examples
from lightning_fragrance.llm.model import BriefModelSize, build_model, save_model
from lightning_fragrance.llm.tokenizer import END, prompt_text, save_tokenizer, train_tokenizer


def test_tokenizer_round_trips_english_korean_and_unseen_text(tmp_path: Path) -> None:
    examples = generate_examples(100, seed=0)
    corpus = [e.text for e in examples] + [brief_to_json(e.brief) for e in examples]
    save_tokenizer(train_tokenizer(corpus, vocab_size=500), tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("fresh citrus, not too sweet", "바닐라는 빼고 포근한 겨울 향", "ünïcödé 🌸"):
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    assert loaded.eos_token == END and loaded.pad_token_id is not None


def test_a_model_directory_reloads_the_tokenizer_with_the_same_ids_and_size(
    tmp_path: Path,
) -> None:
    # transformers 5 rebuilds any qwen2 directory's tokenizer as a Qwen2Tokenizer: it must
    # tokenise as trained and add no token past the model's embedding table.
    examples = generate_examples(50, seed=9)
    corpus = [e.text for e in examples] + [brief_to_json(e.brief) for e in examples]
    trained = train_tokenizer(corpus, vocab_size=400)
    size = BriefModelSize(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
    )
    save_model(build_model(size, trained, seed=0), trained, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == AutoConfig.from_pretrained(str(tmp_path)).vocab_size == len(trained)
    for text in [*corpus, "바닐라 없이, ünïcödé 🌸"]:
        assert loaded(text)["input_ids"] == trained(text)["input_ids"]


def test_the_chat_template_renders_only_the_user_text_between_the_markers(tmp_path: Path) -> None:
    save_tokenizer(train_tokenizer(["a small corpus", "작은 말뭉치"], vocab_size=300), tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [
        {"role": "system", "content": "a long instruction the model was not trained on"},
        {"role": "user", "content": "warm amber"},
    ]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == prompt_text("warm amber")
