"""The serving part of `make demo` with the brief LLM line: a real `lf-serve` (uvicorn, started
by the launcher) serves the SFT model shipped in the package, a real `lf-train task=brief_llm`
process fine-tunes it with GRPO under the guard (in the background, as the demo runs it),
`lf-export`'s code exports the newest checkpoint and the running server hot-reloads it; both
answers carry their brief model's version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_fragrance.demo import BriefFineTune
from lightning_fragrance.llm.shipped import shipped_sft_dir
from lightning_fragrance.serving.demo_steps import BriefLineDemo, run_serving_demo
from lightning_fragrance.serving.loading import read_current

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The demo's fine-tune, scaled down: 2 updates of 4 texts x 4 answers (the demo runs 10 of 8x4).
# Fewer answers make train/reward so noisy that the guard's reward-drop trigger fires (2 x 2
# answers: 0.88 -> 0.43 at update 2, rolled back to the start).
TINY_GRPO = [
    "model.grpo.n_prompts=16",
    "model.grpo.prompts_per_step=4",
    "model.grpo.group_size=4",
    "model.grpo.ptx_texts=4",
]
SOURCES = {"llm", "llm_repaired", "rules_fallback"}


def test_the_demo_serves_the_shipped_brief_model_then_hot_reloads_its_grpo_fine_tune(
    tmp_path: Path, ppo_checkpoints: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = shipped_sft_dir()
    fine_tune = BriefFineTune.start(tmp_path / "brief_grpo", shipped, 2, TINY_GRPO)
    brief = BriefLineDemo(first_export=shipped, fine_tune=fine_tune.wait)
    try:
        result = run_serving_demo(
            ppo_checkpoints[0], ppo_checkpoints[1], tmp_path / "serving", brief_llm=brief
        )
    finally:
        fine_tune.stop()

    assert result.reload["result"] == "success"
    assert result.brief is not None
    assert result.brief.reload["result"] == "success"
    assert result.brief.reload["model"] == "brief_llm"
    # The shipped model is the brief line's first version, through the policy reload too.
    assert result.before.brief_version == result.after.brief_version == "000001-step1250"
    newer = result.brief.after.brief_version
    assert newer.startswith("000002-step") and newer != result.before.brief_version
    assert result.brief.second_before.brief_version == "000001-step1250"
    assert result.brief.second_after.brief_version == newer
    assert result.before.version != result.after.version
    assert result.brief.after.version == result.after.version  # the policy did not move
    answers = (result.before, result.brief.after, result.brief.second_before)
    assert {a.brief_source for a in answers} <= SOURCES
    # On BRIEF_TEXT the shipped model's greedy answer is a valid brief: the LLM wrote it.
    assert result.brief.second_before.brief_source == "llm"
    brief_root = tmp_path / "serving" / "exports" / "brief_llm"
    assert read_current(brief_root) == newer  # the admin reload moved CURRENT
    shipped_files = json.loads((shipped / "manifest.json").read_text())["files"]
    first = json.loads((brief_root / "000001-step1250" / "manifest.json").read_text())
    assert first["files"] == shipped_files  # served byte for byte as shipped
    second = json.loads((brief_root / newer / "manifest.json").read_text())
    assert Path(second["source_checkpoint"]).is_relative_to(tmp_path / "brief_grpo")
    assert newer == f"000002-step{second['source_step']}"
    out = capsys.readouterr().out
    assert f"X-Brief-Model-Version: 000001-step1250 -> {newer}" in out
    assert "GRPO updates under the guard" in out and "reload success" in out
