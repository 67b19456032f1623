"""The brief model: a small Qwen2-architecture causal LM, built from a config, saved and loaded
only through the transformers API (`save_pretrained` / `AutoModelForCausalLM.from_pretrained`).

The architecture is production's (Qwen2.5: RMSNorm, rotary positions, grouped-query attention,
SwiGLU, tied embeddings); only the sizes are scaled to what trains in minutes on 2 CPU cores.
The default (hidden 128, 3 layers, vocab 2048) has about 0.8 M parameters (3.3 MB in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)


@dataclass(frozen=True)
class BriefModelSize:
    """Sizes of the Qwen2 brief model (the architecture's own parameter names).

    Attributes:
        hidden_size: Width of the residual stream.
        num_hidden_layers: Transformer blocks.
        num_attention_heads: Query heads (hidden_size must divide by it).
        num_key_value_heads: Key/value heads (grouped-query attention, as Qwen2.5).
        intermediate_size: Width of the SwiGLU MLP.
        max_position_embeddings: Longest prompt + answer, in tokens.
    """

    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 352
    max_position_embeddings: int = 256


def build_config(size: BriefModelSize, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """A `Qwen2Config` of `size` whose vocabulary and special ids are the tokenizer's."""
    if size.hidden_size % size.num_attention_heads:
        raise ValueError(
            f"hidden_size={size.hidden_size} does not divide into "
            f"num_attention_heads={size.num_attention_heads}; pick a divisor"
        )
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=size.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def build_model(size: BriefModelSize, tokenizer: PreTrainedTokenizerBase, seed: int) -> Any:
    """A freshly initialised Qwen2 causal LM (float32) with its generation config."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(size, tokenizer))
    model.generation_config = default_generation_config(tokenizer)
    return model


def default_generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy, stop at the end token: what `fast` mode and the evaluation use."""
    return GenerationConfig(
        max_new_tokens=96,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> Path:
    """`save_pretrained` the model (safetensors) and the tokenizer into one directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def load_model(directory: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a directory `save_model` wrote: local files, safetensors, no
    remote code (the model directory is data, never code)."""
    path = str(directory)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=False, use_safetensors=True
    )
    return model, tokenizer


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
