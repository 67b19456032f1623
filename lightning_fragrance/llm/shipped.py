"""The brief model shipped in the package, and the command that reproduces it.

``lightning_fragrance/llm/pretrained/brief_sft/`` is the SFT stage of
``lf-train task=brief_llm seed=0`` (782,976 parameters, 3.1 MB, best val/loss 0.0785), stored as
a verified brief export (`llm.export`: the ``save_pretrained`` files plus ``manifest.json`` with
their sha256), so ``make demo`` serves a trained brief LLM without 16 minutes of SFT.

Reproduce it (about 16 minutes of SFT on 2 busy CPU cores; docs/brief-llm.md, "The shipped
model", gives the quality figures a reproduction must reach):

    python -m lightning_fragrance.llm.shipped                      # rewrites the package copy
    python -m lightning_fragrance.llm.shipped --output /tmp/brief_sft
    python -m lightning_fragrance.llm.shipped --seed 1 model.sft.max_epochs=2

The SFT settings are those ``lf-train task=brief_llm`` composes from ``configs/``
(``model.sft``), so the command and the training task cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lightning_fragrance.llm.model import BriefModelSize
from lightning_fragrance.llm.sft import SFTSettings

SHIPPED_SFT_DIR = Path(__file__).resolve().parent / "pretrained" / "brief_sft"


def shipped_sft_dir() -> Path:
    """The shipped SFT model's directory (a brief export; `llm.export.load_brief_export` loads it).

    Raises:
        FileNotFoundError: The package was installed without its data files.
    """
    if not (SHIPPED_SFT_DIR / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{SHIPPED_SFT_DIR} holds no brief model: the package data was not installed "
            "(`pip install -e .` installs it), or run `python -m lightning_fragrance.llm.shipped`"
        )
    return SHIPPED_SFT_DIR


def sft_settings(seed: int = 0, overrides: Sequence[str] = ()) -> SFTSettings:
    """The SFT settings of ``lf-train task=brief_llm seed=<seed> <overrides>``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_fragrance.cli.train import find_config_dir

    with initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["task=brief_llm", f"seed={seed}", "paths.output_dir=.", *overrides],
        )
    fields = OmegaConf.to_container(cfg.model.sft, resolve=True)
    assert isinstance(fields, dict)
    fields["size"] = BriefModelSize(**fields["size"])
    return SFTSettings(**{str(k): v for k, v in fields.items()})


def reproduce(output: Path, seed: int = 0, overrides: Sequence[str] = ()) -> Path:
    """Train the SFT model from `seed`, export it (manifest and sha256) and put it at `output`.

    The export is written beside `output` and swapped in by renames, so `output` holds the old
    model or the new one, never a mix.
    """
    import lightning.pytorch as pl

    from lightning_fragrance.llm.export import export_brief_model
    from lightning_fragrance.llm.model import load_model
    from lightning_fragrance.llm.sft import run_sft

    settings = sft_settings(seed, overrides)
    pl.seed_everything(seed, workers=True, verbose=False)  # as lf-train, before the SFT stage
    with tempfile.TemporaryDirectory(prefix="lf-shipped-") as work:
        result = run_sft(settings, work)
        model, tokenizer = load_model(result.model_dir)
        exported = export_brief_model(
            model,
            tokenizer,
            Path(work) / "export",
            step=result.steps,
            source=f"lf-train task=brief_llm seed={seed} (SFT stage, stopped at step "
            f"{result.steps})",
            metrics={"val_loss": round(result.best_val_loss, 4)},
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        staged = output.parent / f".{output.name}.new"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(exported, staged)
        retired = output.parent / f".{output.name}.old"
        if output.exists():
            os.replace(output, retired)
        os.replace(staged, output)
        shutil.rmtree(retired, ignore_errors=True)
    print(
        f"SFT: {result.parameters:,} parameters, {result.steps} steps, best val/loss "
        f"{result.best_val_loss:.4f}, {result.seconds:.0f} s -> {output}"
    )
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_fragrance.llm.shipped``: reproduce the shipped brief model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, default=SHIPPED_SFT_DIR, help="default: the package")
    parser.add_argument("--seed", type=int, default=0, help="the shipped model's seed is 0")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.sft.n_train=500")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as lf-train (torch_threads: 1)
    reproduce(args.output.resolve(), args.seed, args.overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
