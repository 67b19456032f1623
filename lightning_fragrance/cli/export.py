"""`lf-export` (also `python -m lightning_fragrance.cli.export`): checkpoint → serving export.

    lf-export ckpt_path=outputs/run/checkpoints/checkpoint_step_1000.ckpt
    lf-export ckpt_path=... export_dir=/srv/exports make_current=true
    lf-export ckpt_path=outputs/brief/checkpoints/checkpoint_step_60.ckpt   # the brief LLM
    lf-export ckpt_path=... model_line=brief_llm                           # say it, not detect it

Prints the new version directory. Two model lines: the PPO policy goes to
``<export_dir>/<seq>-step<step>/``, the brief LLM (a `BriefGRPO` checkpoint of
``lf-train task=brief_llm``) to ``<export_dir>/brief_llm/<seq>-step<step>/``, a Hugging Face
directory plus the manifest. ``model_line=auto`` (the default) tells them apart by the
checkpoint's hyperparameters, read with ``weights_only=True`` after the history check: a `BriefGRPO`
checkpoint names its ``sft_dir``, a policy checkpoint never does.

Exits 2, writing nothing, when the export would not serve: a checkpoint whose bytes differ from
its ``checkpoint_history.json`` record (what ``lf-checkpoints verify`` calls CORRUPT), NaN/Inf
weights, weights that do not fit the model its hyperparameters describe (checked on the meta
device, before anything is allocated), or anything ``weights_only=True`` refuses.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from enum import Enum
from pathlib import Path

from omegaconf import DictConfig

from lightning_fragrance.cli.serve import find_config_dir
from lightning_fragrance.serving.loading import (
    DEFAULT_MODEL_CLASS,
    ExportError,
    ModelLoadError,
    _history_entry,
    _verify_against_history,
    export,
    is_store_url,
    load_checkpoint_safely,
)

log = logging.getLogger("lightning_fragrance.cli.export")

# What marks a brief LLM checkpoint (`llm.export.SFT_DIR_HPARAM`; not imported from there, so
# that a policy export does not import transformers).
_BRIEF_HPARAM = "sft_dir"


class ModelLine(str, Enum):
    """Which model a checkpoint holds (``model_line=`` of ``lf-export``)."""

    AUTO = "auto"
    POLICY = "policy"
    BRIEF_LLM = "brief_llm"


def detect_model_line(ckpt_path: str | Path) -> ModelLine:
    """`POLICY` or `BRIEF_LLM`, from the checkpoint's hyperparameters.

    The bytes are checked against the guard's history before the file is read, and it is read
    with ``weights_only=True``: detecting the model line trusts the file no more than exporting.

    Raises:
        ExportError: The history calls the checkpoint corrupt or its bytes differ from it.
        ModelLoadError: Missing, unsafe or not a torch checkpoint.
    """
    source = Path(ckpt_path)
    if source.is_file():
        _verify_against_history(source, _history_entry(source))
    hparams = load_checkpoint_safely(source).get("hyper_parameters")
    is_brief = isinstance(hparams, dict) and _BRIEF_HPARAM in hparams
    return ModelLine.BRIEF_LLM if is_brief else ModelLine.POLICY


def export_checkpoint(
    ckpt_path: str | Path,
    export_dir: str | Path,
    *,
    model: ModelLine | str = ModelLine.AUTO,
    model_class: str = DEFAULT_MODEL_CLASS,
    make_current: bool = False,
) -> Path | str:
    """Export a training checkpoint of either model line; what ``lf-export`` runs.

    Returns the new version's directory (its URL for a policy export to an object store).

    Args:
        ckpt_path: A Lightning checkpoint (PPO policy or `BriefGRPO`).
        export_dir: The export store (the brief LLM's line is its ``brief_llm/`` folder), a
            directory or an object-store URL (``s3://bucket/exports``).
        model: ``auto`` (detect), ``policy`` or ``brief_llm``.
        model_class: The policy's allowlisted class (ignored for the brief LLM).
        make_current: Point the line's ``CURRENT`` at the new version.

    Raises:
        ExportError, ModelLoadError: The checkpoint is refused, or `model` is none of the
            three; nothing was written.
    """
    try:
        line = ModelLine(model)
    except ValueError as error:
        choices = ", ".join(m.value for m in ModelLine)
        raise ExportError(
            f"model_line={model!r} is not a model line; use one of {choices}"
        ) from error
    if line is ModelLine.AUTO:
        line = detect_model_line(ckpt_path)
    if line is ModelLine.POLICY:
        return export(ckpt_path, export_dir, model_class=model_class, make_current=make_current)
    from lightning_fragrance.llm.export import DEFAULT_MODEL_NAME, export_brief_checkpoint

    if not is_store_url(str(export_dir)):
        return export_brief_checkpoint(ckpt_path, export_dir, make_current=make_current)
    # An object store has no rename: the export is built and verified locally, then published
    # like a policy export (files first, manifest.json last, CURRENT after it).
    from lightning_fragrance.serving.object_store import publish_export_directory

    with tempfile.TemporaryDirectory(prefix="lf-export-") as staging:
        local = export_brief_checkpoint(ckpt_path, staging)
        url = str(export_dir).rstrip("/") + "/" + DEFAULT_MODEL_NAME
        return publish_export_directory(local, url, make_current=make_current)


def _hydra_entry(cfg: DictConfig) -> None:
    try:
        path = export_checkpoint(
            str(cfg.ckpt_path),
            str(cfg.export_dir),
            model=str(cfg.get("model_line", ModelLine.AUTO.value)),
            model_class=str(cfg.model_class),
            make_current=bool(cfg.make_current),
        )
    except (ExportError, ModelLoadError) as exc:
        print(f"lf-export: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(path)


def main() -> None:
    """Console-script entry point (``lf-export``)."""
    import hydra

    config_dir = find_config_dir("export")
    hydra.main(version_base="1.3", config_path=str(config_dir), config_name="export")(
        _hydra_entry
    )()


if __name__ == "__main__":
    main()
