"""A byte-level BPE tokenizer trained on the project's own corpus, saved as a Hugging Face one.

No tokenizer can be downloaded here, and a general-purpose one would spend most of its vocabulary
on words no customer of a perfumer writes. Training our own with the `tokenizers` library (the
Rust library behind every "fast" Hugging Face tokenizer) on the generated texts and answers makes
the JSON keys, the catalogue names and common Korean syllables single tokens: the answer is
about a third as long as with raw bytes, and generation time goes with it. Byte-level means no
text is ever unknown (any Korean or emoji the generator never wrote still encodes).

The tokenizer is a `Qwen2Tokenizer` (a fast, `tokenizers`-backed class) with Qwen2's own
normaliser (NFC) and pre-tokeniser: transformers 5 loads the tokenizer of any `qwen2` model
directory as a `Qwen2Tokenizer` rebuilt from the saved vocabulary and merges, whatever class saved
it, so a tokenizer trained with other rules would silently tokenise differently once reloaded.
Its unknown token (`<|endoftext|>`, Qwen2's default) is in the trained vocabulary for the same
reason: the class adds it otherwise, one id past the model's embedding table.

The chat template renders only the user's message between two special tokens: the model was
trained for one instruction, so the serving layer's long system prompt is not rendered (it
would cost prompt tokens the model never saw). `LLMBriefGenerator` in serving applies the chat
template when a tokenizer has one, so it prompts this model exactly as it was trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

PAD, USER, BRIEF, END = "<|pad|>", "<|user|>", "<|brief|>", "<|end|>"
UNK = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, USER, BRIEF, END, UNK)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    + USER
    + "{{ message['content'] }}{% endif %}{% endfor %}"
    + "{% if add_generation_prompt %}"
    + BRIEF
    + "{% endif %}"
)


def prompt_text(user_text: str) -> str:
    """The prompt the chat template renders for `user_text` (training uses the same string)."""
    return f"{USER}{user_text}{BRIEF}"


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and wrap it for transformers.

    Args:
        corpus: Texts and answers the model will read and write.
        vocab_size: Target vocabulary, special tokens included.
    """
    tokenizer = Tokenizer(models.BPE())
    # Qwen2's normaliser and pre-tokeniser, exactly (see the module docstring).
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is in the base alphabet, so no input is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bpe = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    return Qwen2Tokenizer(
        vocab=bpe["vocab"],
        # tokenizers' BPE takes merges as pairs; transformers' hint says strings.
        merges=merges,  # type: ignore[arg-type]
        unk_token=UNK,
        pad_token=PAD,
        eos_token=END,
        additional_special_tokens=[USER, BRIEF],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """`save_pretrained` into `directory` (created) and return it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    return path
