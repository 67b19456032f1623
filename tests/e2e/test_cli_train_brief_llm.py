"""`lf-train task=brief_llm` end to end: a real subprocess, the real configs, a tiny model.

The SFT stage trains a tiny Qwen2 from scratch, GRPO fits under the guard, a learning-rate spike
is rolled back, and the final policy is a `save_pretrained` directory transformers loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

TINY_LLM = [
    "task=brief_llm",
    "model.sft.n_train=96",
    "model.sft.n_val=16",
    "model.sft.vocab_size=600",
    "model.sft.size.hidden_size=32",
    "model.sft.size.num_hidden_layers=1",
    "model.sft.size.num_attention_heads=2",
    "model.sft.size.num_key_value_heads=1",
    "model.sft.size.intermediate_size=64",
    "model.sft.max_steps=8",
    "model.sft.val_check_interval=1.0",
    "model.grpo.n_prompts=32",
    "model.grpo.prompts_per_step=2",
    "model.grpo.group_size=2",
    "model.grpo.max_new_tokens=16",
    "model.grpo.learning_rate=1e-4",
    "trainer.enable_progress_bar=false",
]


def test_lf_train_brief_llm_trains_sft_then_grpo_and_rolls_back_an_lr_spike(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "lightning_fragrance.cli.train",
        f"hydra.run.dir={out}",
        *TINY_LLM,
        "experiment=brief_llm_lr_spike",
        "callbacks.fault.at_step=4",
        "callbacks.fault.lr_factor=1000",
        "callbacks.rollback.save_every_n_steps=2",
        "trainer.max_steps=8",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "checkpoints" / "checkpoint_history.json").read_text())
    rollbacks = [e for e in history["events"] if e.get("type") == "rollback"]
    assert rollbacks and rollbacks[0]["to_step"] <= 4
    assert "kl" in rollbacks[0]["reason"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[-1]["step"] == 8
    assert {"train/kl", "train/ref_kl", "train/loss", "train/reward"} <= set(metrics[-1])
    assert AutoModelForCausalLM.from_pretrained(str(out / "rl")).config.model_type == "qwen2"
    assert (out / "sft" / "tokenizer.json").is_file()
