"""The `lf-train task=brief_llm` entry: the SFT stage (unless an SFT model is given), then the
GRPO module that the configured Trainer fits under the rollback guard.

Hydra instantiates `build_brief_llm_task` as the task's `model`, so `lf-train` itself stays
"compose, instantiate, fit" for both tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning_fragrance.llm.grpo import BriefGRPO
from lightning_fragrance.llm.model import BriefModelSize
from lightning_fragrance.llm.sft import SFTSettings, run_sft

log = logging.getLogger(__name__)


def build_brief_llm_task(
    output_dir: str,
    sft_dir: str | None = None,
    sft: dict[str, Any] | None = None,
    grpo: dict[str, Any] | None = None,
) -> BriefGRPO:
    """Train (or reuse) the SFT model, then build the GRPO module on it.

    Args:
        output_dir: The run directory; SFT writes `sft/`, the final policy goes to `rl/`.
        sft_dir: An existing SFT model directory; None trains one first (`sft` settings).
        sft: `SFTSettings` fields (`size` as a dict of `BriefModelSize` fields).
        grpo: `BriefGRPO` arguments other than `sft_dir` and `save_dir`.

    Raises:
        FileNotFoundError: `sft_dir` has no `config.json` (not a `save_pretrained` directory).
    """
    out = Path(output_dir)
    if sft_dir is None:
        fields = dict(sft or {})
        fields["size"] = BriefModelSize(**fields.get("size", {}))
        result = run_sft(SFTSettings(**fields), out)
        log.info(
            "SFT model: %d parameters, %d steps, best val/loss %.4f, %.0f s -> %s",
            result.parameters,
            result.steps,
            result.best_val_loss,
            result.seconds,
            result.model_dir,
        )
        sft_dir = str(result.model_dir)
    elif not (Path(sft_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"sft_dir={sft_dir} has no config.json; point it at a directory written by "
            "save_pretrained (a previous run's <output_dir>/sft), or leave it null to train one"
        )
    return BriefGRPO(sft_dir=sft_dir, save_dir=str(out / "rl"), **dict(grpo or {}))
