"""GRPO fine-tuning of the SFT brief model, as a LightningModule the rollback guard can watch.

One training step (one optimizer step, so `global_step` counts updates as in `rl.PPO`):

1. sample `group_size` answers for each of `prompts_per_step` labelled texts from the policy;
2. reward each answer (`score.AnswerScore.reward`: JSON without repair, a valid `Brief`, the
   field score against the label) and normalise the rewards within each text's group (GRPO,
   Shao et al. 2024: the group mean is the baseline, no value network);
3. loss = policy-gradient surrogate + `kl_coef` x per-token KL to the frozen SFT reference
   (the k3 estimator, as in GRPO) + `ptx_coef` x the SFT loss on a fixed anchor set of
   `ptx_texts` labelled texts;
4. after the step, measure the update: the per-token KL between the policy before and after it.

Why the SFT term (InstructGPT's "PPO-ptx", Ouyang et al. 2022): the surrogate of a group-
normalised objective is zero at the rollout policy, so on its own `train/loss` would say nothing
(or, averaged over tokens instead of answers, be noise around 0) and the guard's "loss x2"
trigger would compare noise with noise. With the labelled term on a fixed anchor set the loss
is positive and moves only when the policy forgets what SFT taught it, which is what a loss spike
should mean here; it also keeps RL from drifting into answers the reward cannot see.

Logged every step: `train/kl` (the update's KL, old -> new policy: what the operations guide's
0.03 threshold is for), `train/ref_kl` (KL to the SFT reference: watched, not a trigger, it grows
by design), `train/loss`, `train/reward`, and their parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_fragrance.llm.data import LabelledText, Split, generate_examples
from lightning_fragrance.llm.generation import decode_answers, generate_ids
from lightning_fragrance.llm.model import load_model, save_model
from lightning_fragrance.llm.score import score_answer
from lightning_fragrance.llm.sft import collate_sft, encode_example


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1.0 on answer tokens up to and including the first end token, 0.0 after it."""
    is_eos = (completion == eos_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).float()


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, over the group's std (+ a floor, so
    a group of equal rewards gives 0 and not 0/0)."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (per token, over the whole batch)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_log_probs(
    model: Any, sequences: torch.Tensor, attention: torch.Tensor, n_prompt: int
) -> torch.Tensor:
    """Log-softmax over the vocabulary at every answer position: (batch, answer, vocab).

    Position ids follow the attention mask (left padding), as `generate` computes them, so the
    distribution scored here is the one the answers were sampled from.
    """
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=attention, position_ids=positions).logits
    return torch.log_softmax(logits[:, n_prompt - 1 : -1].float(), dim=-1)


class BriefGRPO(pl.LightningModule):
    """GRPO on the brief model with a KL penalty to the SFT reference.

    Args:
        sft_dir: The SFT model directory (`save_pretrained`); policy and reference load from it.
        n_prompts: Generated labelled texts to draw prompts from.
        seed: Seeds the prompt texts (kept apart from the SFT texts by an offset).
        prompts_per_step: Texts per update.
        group_size: Answers sampled per text (the GRPO group).
        learning_rate: Adam learning rate.
        kl_coef: Weight of the per-token KL to the reference in the loss.
        ptx_coef: Weight of the SFT loss on the labelled answers.
        ptx_texts: Labelled texts in the SFT term (a fixed anchor set, drawn once).
        max_new_tokens: Longest sampled answer.
        temperature: Sampling temperature of the rollouts.
        max_grad_norm: Gradient clipping.
        save_dir: Where `on_fit_end` saves the final policy (`save_pretrained`); None: nowhere.
    """

    def __init__(
        self,
        sft_dir: str,
        n_prompts: int = 2000,
        seed: int = 0,
        prompts_per_step: int = 8,
        group_size: int = 4,
        learning_rate: float = 5e-5,
        kl_coef: float = 0.05,
        ptx_coef: float = 1.0,
        ptx_texts: int = 32,
        max_new_tokens: int = 96,
        temperature: float = 1.0,
        max_grad_norm: float = 1.0,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(f"group_size={group_size}: GRPO needs at least 2 answers per text")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.policy, self.tokenizer = load_model(sft_dir)
        self.reference, _ = load_model(sft_dir)
        self.reference.requires_grad_(False)
        self.reference.eval()

    def setup(self, stage: str) -> None:
        seed = int(self.hparams["seed"])
        self.examples = generate_examples(int(self.hparams["n_prompts"]), seed + 2, Split.TRAIN)
        # A fixed anchor set for the SFT term: its value then moves only when the policy does,
        # not with the batch (over 8 changing texts it varied 3x between healthy updates, and
        # the guard's loss x2 trigger fired on that noise).
        anchor = generate_examples(int(self.hparams["ptx_texts"]), seed + 3, Split.TRAIN)
        pad_id = int(self.tokenizer.pad_token_id)
        self.anchor_batch = collate_sft([encode_example(self.tokenizer, e) for e in anchor], pad_id)

    def train_dataloader(self) -> DataLoader[Any]:
        # Batches of indices into `self.examples`: Lightning moves batches between devices and
        # would refuse (frozen) records; a tensor of indices moves anywhere.
        generator = torch.Generator().manual_seed(int(self.hparams["seed"]))
        return DataLoader(
            range(len(self.examples)),  # type: ignore[arg-type]
            batch_size=int(self.hparams["prompts_per_step"]),
            shuffle=True,
            drop_last=True,
            generator=generator,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.policy.parameters(), lr=float(self.hparams["learning_rate"]))

    def _rollout(self, batch: list[LabelledText]) -> dict[str, Any]:
        """Sample the groups and score them (no gradient)."""
        group = int(self.hparams["group_size"])
        self.policy.eval()
        sequences, n_prompt = generate_ids(
            self.policy,
            self.tokenizer,
            [e.text for e in batch],
            max_new_tokens=int(self.hparams["max_new_tokens"]),
            do_sample=True,
            temperature=float(self.hparams["temperature"]),
            num_return_sequences=group,
        )
        self.policy.train()
        answers = decode_answers(self.tokenizer, sequences, n_prompt)
        scores = [score_answer(a, batch[i // group].brief) for i, a in enumerate(answers)]
        pad_id = int(self.tokenizer.pad_token_id)
        mask = completion_mask(sequences[:, n_prompt:], int(self.tokenizer.eos_token_id))
        attention = torch.cat([(sequences[:, :n_prompt] != pad_id).float(), mask], dim=1).long()
        return {
            "sequences": sequences,
            "n_prompt": n_prompt,
            "mask": mask,
            "attention": attention,
            "rewards": torch.tensor([s.reward for s in scores]),
            "json_valid": sum(s.json_valid for s in scores) / len(scores),
            "field_score": sum(s.score for s in scores) / len(scores),
        }

    def training_step(self, indices: torch.Tensor, batch_idx: int) -> None:
        batch = [self.examples[int(i)] for i in indices]
        roll = self._rollout(batch)
        seqs, attention, n_prompt, mask = (
            roll["sequences"],
            roll["attention"],
            roll["n_prompt"],
            roll["mask"],
        )
        chosen = seqs[:, n_prompt:].unsqueeze(-1)
        log_probs = token_log_probs(self.policy, seqs, attention, n_prompt)
        with torch.no_grad():
            ref_lp = token_log_probs(self.reference, seqs, attention, n_prompt).gather(-1, chosen)
        lp = log_probs.gather(-1, chosen).squeeze(-1)
        advantages = group_advantages(roll["rewards"], int(self.hparams["group_size"]))
        # One update per rollout: the ratio is 1 in value and carries the gradient of log p
        # (the PPO clip would never bind, so it is left out). Tokens are averaged per answer,
        # then answers per batch (GRPO's 1/|o_i|): as the advantages of a group sum to zero,
        # the surrogate's value is exactly 0 and only its gradient counts.
        ratio = torch.exp(lp - lp.detach())
        per_answer = (ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        pg_loss = -(advantages * per_answer).mean()
        delta = ref_lp.squeeze(-1) - lp
        ref_kl = masked_mean(torch.exp(delta) - delta - 1.0, mask)  # k3, >= 0 per token
        ptx_loss = self.policy(**self.anchor_batch).loss
        loss = (
            pg_loss
            + float(self.hparams["kl_coef"]) * ref_kl
            + float(self.hparams["ptx_coef"]) * ptx_loss
        )
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.policy.parameters(), float(self.hparams["max_grad_norm"])
        )
        optimizer.step()  # type: ignore[union-attr]
        update_kl = self._update_kl(log_probs.detach(), seqs, attention, n_prompt, mask)
        self._log_step(
            {
                "train/loss": loss.detach(),
                "train/reward": roll["rewards"].mean(),
                "train/kl": update_kl,
                "train/ref_kl": ref_kl.detach(),
                "train/pg_loss": pg_loss.detach(),
                "train/ptx_loss": ptx_loss.detach(),
                "train/json_valid": torch.tensor(roll["json_valid"]),
                "train/field_score": torch.tensor(roll["field_score"]),
                "train/grad_norm": grad_norm.detach(),
            },
            batch_size=len(batch),
        )

    @torch.no_grad()
    def _update_kl(
        self,
        old: torch.Tensor,
        seqs: torch.Tensor,
        attention: torch.Tensor,
        n_prompt: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Exact per-token KL(old || new) over the vocabulary on the rollout's answer tokens:
        how far this one update moved the policy (the vocabulary is small, so no estimator)."""
        new = token_log_probs(self.policy, seqs, attention, n_prompt)
        per_token = (old.exp() * (old - new)).sum(dim=-1)
        return masked_mean(per_token, mask)

    def _log_step(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, value in values.items():
            self.log(
                name,
                value,
                on_step=True,
                on_epoch=False,
                batch_size=batch_size,
                prog_bar=name in ("train/reward", "train/kl"),
            )

    def on_fit_end(self) -> None:
        save_dir = self.hparams.get("save_dir")
        if save_dir:
            save_model(self.policy, self.tokenizer, Path(str(save_dir)))
