"""Batched answers from the brief model through `model.generate` (left padding, as decoder-only
models need: every row's last prompt token sits in the last column)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_fragrance.llm.tokenizer import prompt_text


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids and attention mask for `texts`."""
    tokenizer.padding_side = "left"
    batch: dict[str, torch.Tensor] = tokenizer(
        [prompt_text(t) for t in texts],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    return dict(batch)


@torch.no_grad()  # not inference_mode: RL reuses the sampled ids in a graph
def generate_ids(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
) -> tuple[torch.Tensor, int]:
    """(prompt + answer ids, prompt length) for `texts`; rows repeat each prompt
    `num_return_sequences` times, consecutively."""
    inputs = encode_prompts(tokenizer, texts)
    kwargs: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        # top_k=0: sample from the whole distribution, so the rollout policy is exactly the
        # model's softmax (what the RL losses assume), not a truncated one.
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    return output, int(inputs["input_ids"].shape[1])


def decode_answers(tokenizer: Any, output: torch.Tensor, prompt_length: int) -> list[str]:
    """The answers in `output` (prompt, end token and padding removed)."""
    return [str(tokenizer.decode(row[prompt_length:], skip_special_tokens=True)) for row in output]


def generate_answers(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 96,
) -> list[str]:
    """Greedy answers for `texts`, `batch_size` at a time."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        output, n_prompt = generate_ids(model, tokenizer, chunk, max_new_tokens=max_new_tokens)
        answers += decode_answers(tokenizer, output, n_prompt)
    model.train(was_training)
    return answers
