"""Supervised fine-tuning of the brief model: a LightningModule, the data it reads, and the stage
that builds everything from scratch (texts -> tokenizer -> model -> fit with early stopping).

Only the answer is learned (prompt tokens are masked out of the loss), the way instruction
tuning is usually done: the model should write briefs, not customer texts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_fragrance.llm.data import LabelledText, Split, brief_to_json, generate_examples
from lightning_fragrance.llm.model import BriefModelSize, build_model, parameter_count, save_model
from lightning_fragrance.llm.tokenizer import prompt_text, train_tokenizer

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: LabelledText
) -> tuple[list[int], int]:
    """(prompt + answer + end token ids, number of prompt tokens)."""
    prompt = tokenizer(prompt_text(example.text), add_special_tokens=False)["input_ids"]
    answer = tokenizer(brief_to_json(example.brief), add_special_tokens=False)["input_ids"]
    return [*prompt, *answer, tokenizer.eos_token_id], len(prompt)


def collate_sft(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (prompt and padding masked out)."""
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def sft_loader(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[LabelledText],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader[Any]:
    """A loader of collated SFT batches (examples are tokenised once, up front)."""
    encoded = [encode_example(tokenizer, e) for e in examples]
    pad_id = int(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        encoded,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda batch: collate_sft(batch, pad_id),
    )


class BriefSFT(pl.LightningModule):
    """Next-token cross-entropy on the answer of (text, brief) pairs.

    Args:
        model: A transformers causal LM (the `build_model` Qwen2).
        learning_rate: Peak AdamW learning rate.
        warmup_steps: Linear warm-up from 0 (small transformers diverge without one).
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        model: Any,
        learning_rate: float = 3e-3,
        warmup_steps: int = 50,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss: torch.Tensor = self.model(**batch).loss
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        warmup = max(1, self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


@dataclass
class SFTSettings:
    """Everything the SFT stage needs; the defaults train in about two minutes on 2 cores.

    Attributes:
        n_train: Generated training texts.
        n_val: Generated validation texts (early stopping watches their loss).
        seed: Seeds the data, the initial weights and the loader order.
        vocab_size: Tokenizer vocabulary.
        size: Model sizes.
        batch_size: Texts per step.
        learning_rate: Peak AdamW learning rate.
        max_epochs: Upper bound; early stopping usually ends sooner.
        patience: Validations without a new best `val/loss` before stopping.
        val_check_interval: Validate every this many training batches (or fraction of an epoch).
        max_steps: Hard cap on optimizer steps (-1: none); tests use a handful.
        max_time: Hard cap on training time, Lightning's "DD:HH:MM:SS" (None: none); a
            benchmark with a time bound uses it.
    """

    n_train: int = 4000
    n_val: int = 256
    seed: int = 0
    vocab_size: int = 2048
    size: BriefModelSize = field(default_factory=BriefModelSize)
    batch_size: int = 32
    learning_rate: float = 3e-3
    max_epochs: int = 10
    patience: int = 2
    val_check_interval: float | int = 0.5
    max_steps: int = -1
    max_time: str | None = None


@dataclass(frozen=True)
class SFTResult:
    """What the SFT stage wrote and measured."""

    model_dir: Path
    parameters: int
    steps: int
    best_val_loss: float
    seconds: float


def run_sft(settings: SFTSettings, output_dir: str | Path) -> SFTResult:
    """Generate the data, train the tokenizer, fit the model with early stopping, save it.

    The saved directory (`output_dir/sft`) holds the best-validation weights, the tokenizer and
    a generation config; it loads with `AutoModelForCausalLM.from_pretrained`.
    """
    started = time.perf_counter()
    out = Path(output_dir)
    train = generate_examples(settings.n_train, settings.seed, Split.TRAIN)
    val = generate_examples(settings.n_val, settings.seed + 1, Split.TRAIN)
    corpus = [e.text for e in train] + [brief_to_json(e.brief) for e in train]
    tokenizer = train_tokenizer(corpus, vocab_size=settings.vocab_size)
    model = build_model(settings.size, tokenizer, settings.seed)
    module = BriefSFT(model, learning_rate=settings.learning_rate)
    stopper = EarlyStopping(monitor="val/loss", patience=settings.patience, mode="min")
    best = _BestWeights()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=settings.max_epochs,
        max_steps=settings.max_steps,
        max_time=settings.max_time,
        val_check_interval=settings.val_check_interval,
        callbacks=[stopper, best],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    trainer.fit(
        module,
        train_dataloaders=sft_loader(tokenizer, train, settings.batch_size, True, settings.seed),
        val_dataloaders=sft_loader(tokenizer, val, settings.batch_size, False),
    )
    best.restore(module)
    model_dir = save_model(model, tokenizer, out / "sft")
    result = SFTResult(
        model_dir=model_dir,
        parameters=parameter_count(model),
        steps=trainer.global_step,
        best_val_loss=best.best_loss,
        seconds=time.perf_counter() - started,
    )
    log.info("SFT: %s", result)
    return result


class _BestWeights(pl.Callback):
    """Keeps the weights of the best validation loss in memory (the model is a few MB), so the
    saved model is the one early stopping judged best, not the last one it saw."""

    def __init__(self) -> None:
        self.best_loss = float("inf")
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            log.info("SFT step %d: val/loss %.4f", trainer.global_step, float(loss))
        if loss is not None and float(loss) < self.best_loss:
            self.best_loss = float(loss)
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def restore(self, module: torch.nn.Module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)
