"""Brief quality of the trained brief LLM (SFT, then SFT + GRPO) against the rule parser.

What it measures (issue 11): how well a small Qwen2 brief model trained here writes briefs (valid
JSON without repair, agreement with the labelled brief) next to the keyword rules
(`parse_brief`), on texts whose sentence frames it never saw and on 60 hand-written texts (30
English, 30 Korean, `benchmarks/data/brief_handwritten.jsonl`) that the generator never
produced, and whether GRPO improves on SFT. Measured so far: the rules still win on both sets
and GRPO moves the figures by 0.01 or less; docs/brief-llm.md gives the figures and says why.

Figures, per set: JSON-valid-without-repair rate (the rules write no JSON: n/a) and the mean
field score (docs/brief-llm.md), for SFT, SFT+RL and the rules, with the ratios.

Run:
    python benchmarks/bench_brief_llm.py --run-dir outputs/train/<run>  # lf-train task=brief_llm
    python benchmarks/bench_brief_llm.py --sft-dir lightning_fragrance/llm/pretrained/brief_sft
    python benchmarks/bench_brief_llm.py                                # trains a small budget
`--sft-dir` (with `--rl-dir` optionally) evaluates given model directories, e.g. the shipped
model (an export directory loads like a `save_pretrained` one); without an RL model the SFT+RL
row is left out.
The second form trains SFT for `--sft-minutes` (2.5, a Trainer `max_time`) and GRPO for
`--rl-steps` (10) updates under the guard, so the whole benchmark stays under 5 minutes; its
figures are lower than those of a full run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_fragrance.fragrance.brief import BriefError, parse_brief
from lightning_fragrance.llm.data import (
    LabelledText,
    Language,
    Split,
    generate_examples,
    read_labelled_jsonl,
)
from lightning_fragrance.llm.generation import generate_answers
from lightning_fragrance.llm.model import load_model, parameter_count
from lightning_fragrance.llm.score import field_score, score_answer

HANDWRITTEN = Path(__file__).parent / "data" / "brief_handwritten.jsonl"
HELDOUT_TEXTS = 200
HELDOUT_SEED = 12345


@dataclass(frozen=True)
class Quality:
    """How one system did on one set."""

    json_valid: float | None  # None: the system writes no JSON (the rules)
    field_score: float
    seconds: float


def llm_quality(model_dir: Path, examples: list[LabelledText]) -> Quality:
    model, tokenizer = load_model(model_dir)
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, [e.text for e in examples], batch_size=32)
    scores = [score_answer(a, e.brief) for a, e in zip(answers, examples, strict=True)]
    return Quality(
        json_valid=statistics.mean(s.json_valid for s in scores),
        field_score=statistics.mean(s.score for s in scores),
        seconds=time.perf_counter() - started,
    )


def rules_quality(examples: list[LabelledText]) -> Quality:
    started = time.perf_counter()
    scores = []
    for example in examples:
        try:
            scores.append(field_score(parse_brief(example.text), example.brief))
        except BriefError:
            scores.append(0.0)
    return Quality(None, statistics.mean(scores), time.perf_counter() - started)


def train_small(out: Path, sft_minutes: float, rl_steps: int) -> tuple[Path, Path]:
    """SFT then GRPO under the guard with the operations guide's thresholds, small budgets."""
    import lightning.pytorch as pl

    from lightning_fragrance.callbacks import RollbackCheckpoint
    from lightning_fragrance.llm.grpo import BriefGRPO
    from lightning_fragrance.llm.sft import SFTSettings, run_sft

    started = time.perf_counter()
    seconds = int(sft_minutes * 60)
    max_time = f"00:00:{seconds // 60:02d}:{seconds % 60:02d}"
    sft = run_sft(SFTSettings(max_time=max_time, val_check_interval=50), out)
    print(
        f"SFT: {sft.parameters:,} parameters, {sft.steps} steps, best val/loss "
        f"{sft.best_val_loss:.4f}, {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    started = time.perf_counter()
    guard = RollbackCheckpoint(dirpath=str(out / "checkpoints"), save_every_n_steps=5)
    module = BriefGRPO(sft_dir=str(sft.model_dir), save_dir=str(out / "rl"))
    trainer = pl.Trainer(
        max_steps=rl_steps,
        max_time="00:00:01:30",  # the benchmark's time bound holds on a busy machine too
        logger=False,
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    trainer.fit(module)
    guard.flush()
    print(
        f"GRPO: {trainer.global_step} updates, {len(guard.rollback_events)} rollback(s), "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return sft.model_dir, out / "rl"


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "  n/a" if a is None or b is None or b == 0 else f"{a / b:5.2f}x"


def report(name: str, examples: list[LabelledText], sft_dir: Path, rl_dir: Path | None) -> None:
    sft, rules = llm_quality(sft_dir, examples), rules_quality(examples)
    rl = None if rl_dir is None else llm_quality(rl_dir, examples)
    print(f"\n{name} ({len(examples)} texts)")
    print(f"  {'system':<10} {'json-valid':>10} {'field score':>12} {'seconds':>8}")
    rows = (("SFT", sft), ("SFT+RL", rl), ("rules", rules))
    for label, q in ((label, q) for label, q in rows if q is not None):
        print(f"  {label:<10} {_fmt(q.json_valid):>10} {_fmt(q.field_score):>12} {q.seconds:8.1f}")
    ratios = f"SFT / rules = {_ratio(sft.field_score, rules.field_score)}"
    if rl is not None:
        ratios = (
            f"SFT+RL / SFT = {_ratio(rl.field_score, sft.field_score)} (field score), "
            f"{_ratio(rl.json_valid, sft.json_valid)} (json-valid); {ratios}; "
            f"SFT+RL / rules = {_ratio(rl.field_score, rules.field_score)}"
        )
    print(f"  ratios: {ratios}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a `lf-train task=brief_llm` run directory")
    parser.add_argument("--sft-dir", type=Path, help="an SFT model directory to evaluate")
    parser.add_argument("--rl-dir", type=Path, help="with --sft-dir: its RL model directory")
    parser.add_argument("--sft-minutes", type=float, default=2.5, help="SFT time budget")
    parser.add_argument("--rl-steps", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a shared 2-core machine
    with tempfile.TemporaryDirectory() as tmp:
        rl_dir: Path | None
        if args.sft_dir is not None:
            sft_dir, rl_dir = args.sft_dir, args.rl_dir
        elif args.run_dir is not None:
            sft_dir, rl_dir = args.run_dir / "sft", args.run_dir / "rl"
        else:
            sft_dir, rl_dir = train_small(Path(tmp), args.sft_minutes, args.rl_steps)
        model, _ = load_model(sft_dir)
        print(f"brief model: Qwen2, {parameter_count(model):,} parameters ({sft_dir})")
        handwritten = read_labelled_jsonl(HANDWRITTEN)
        heldout = generate_examples(HELDOUT_TEXTS, HELDOUT_SEED, Split.HELDOUT)
        report("held-out templates", heldout, sft_dir, rl_dir)
        report("hand-written", handwritten, sft_dir, rl_dir)
        for language in Language:
            subset = [e for e in handwritten if e.language is language]
            report(f"hand-written, {language.value}", subset, sft_dir, rl_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
