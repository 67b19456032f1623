"""Random-weight brief models in the served format, for serving tests and benchmarks.

Serving does not care what the weights learnt: loading, warm-up, batching, the drain and the
memory of a reload depend on the format and the size. These exports are the real thing in
every other respect: a Qwen2 causal LM with a tokenizer trained by ``tokenizers``, written by
``save_pretrained`` through ``llm.export.export_brief_model`` (manifest, sha256, ``CURRENT``)
and read back only through ``from_pretrained``. Their answers are noise, so ``/dna/create``
falls back to the rules (``X-Brief-Source: rules_fallback``), which is also a real path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_fragrance.llm.export import DEFAULT_MODEL_NAME, export_brief_model
from lightning_fragrance.llm.model import BriefModelSize, build_model, parameter_count
from lightning_fragrance.llm.tokenizer import train_tokenizer

# The smallest shape that is still the architecture: grouped-query attention, 2 layers.
TINY_SIZE = BriefModelSize(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    max_position_embeddings=512,
)
# About 26.6 M parameters, 106 MB (10^6 bytes) of float32 safetensors: big enough that load,
# copy and allocator effects show in the reload figures (issue 11 asks for >= 100 MB).
LARGE_SIZE = BriefModelSize(
    hidden_size=512,
    num_hidden_layers=7,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=2048,
    max_position_embeddings=512,
)
_CORPUS = (
    "a fresh citrus scent for summer, not too sweet",
    "warm amber and vanilla for winter evenings",
    "a green floral for spring, light and airy",
    "woody and smoky, no vanilla please",
    "여름에 어울리는 상큼한 시트러스 향",
    "달지 않은 플로럴 향수를 원해요",
    '{"profile": {"citrus": 0.8, "floral": 0.2}, "intensity": "light"}',
)


def export_random_brief_models(
    store: str | Path,
    *,
    size: BriefModelSize = TINY_SIZE,
    seeds: tuple[int, ...] = (1, 2),
    vocab_size: int = 400,
    model_name: str = DEFAULT_MODEL_NAME,
) -> list[Path]:
    """Export one random model per seed into ``store/model_name/`` (the first made CURRENT).

    Returns:
        The version directories, oldest first.
    """
    tokenizer = train_tokenizer(list(_CORPUS) * 4, vocab_size=vocab_size)
    paths = []
    for index, seed in enumerate(seeds):
        model = build_model(size, tokenizer, seed)
        _spread_weights(model, seed)
        paths.append(
            export_brief_model(
                model,
                tokenizer,
                store,
                step=seed,
                source=f"random weights, seed {seed}, {parameter_count(model)} parameters",
                model_name=model_name,
                make_current=index == 0,
            )
        )
    return paths


def _spread_weights(model: Any, seed: int) -> None:
    # At the usual init (std 0.02) the residual stream carries the input embedding through and
    # the tied head answers the last prompt token again and again. Weights at std
    # 2/sqrt(fan_in) and unit-variance embeddings give answers of varied tokens and lengths,
    # which is what batching (padding, rows that end at different steps) has to get right.
    generator = torch.Generator().manual_seed(seed)
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() != 2:
                continue  # norms stay at one
            noise = torch.randn(parameter.shape, generator=generator)
            scale = 1.0 if parameter is embeddings else 2.0 / parameter.shape[1] ** 0.5
            parameter.copy_(noise * scale)
