"""Export the brief model as a versioned Hugging Face directory with the project's manifest, and
load such an export back with the same safety rules as the policy exports.

Layout (issue 11, item 3): ``<store>/<model>/<seq>-step<step>/`` holding what ``save_pretrained``
writes (``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer files,
``chat_template.jinja``) plus ``manifest.json`` (``serving.loading.ExportManifest``: sha256 and
size of every file, source, step, metrics, time), and one ``<store>/<model>/CURRENT``. The
directory is written under a hidden temporary name and renamed into place, so a reader sees no
export or a complete one.

Loading (`load_brief_export`) refuses, before any tensor is read: a manifest that is not valid;
a file that is not listed (a ``.py`` next to the weights could be remote code), a listed one that
is missing, a link or not a regular file, or whose size or sha256 differs; a safetensors header
whose keys or shapes do not fit the architecture that ``config.json`` describes (built on the
meta device, so a header that declares huge tensors costs nothing). Only then does
``from_pretrained`` run, on local files, safetensors only, without remote code.

Exporting a guard checkpoint (`export_brief_checkpoint`, what ``lf-export`` runs for a
`BriefGRPO` checkpoint) follows the policy's rules: its sha256 against the guard's
``checkpoint_history.json``, ``weights_only=True``, shapes on the meta device, finite weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_fragrance.llm.model import load_model, save_model

# The private helpers are the checks `serving.loading.export` runs on a policy checkpoint
# (history sha256, non-finite weights): both model lines refuse the same checkpoints alike.
from lightning_fragrance.serving.loading import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    WEIGHTS_FILE,
    ChecksumMismatchError,
    ExportError,
    ExportManifest,
    ExportNotFoundError,
    FileEntry,
    IncompleteExportError,
    ManifestInvalidError,
    StateDictMismatchError,
    UnsafeExportFileError,
    _history_entry,
    _metrics_from_history,
    _refuse_non_finite,
    _verify_against_history,
    check_shapes,
    load_checkpoint_safely,
    read_safetensors_header,
    rename_export_into_place,
    sha256_file,
    write_current,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "brief_llm"
# The files every brief export must hold (the tokenizer may add more, e.g. a vocab file).
REQUIRED_FILES = ("config.json", WEIGHTS_FILE, "generation_config.json", "tokenizer.json")
# The weights of the policy inside a GRPO training checkpoint (`BriefGRPO.policy`).
CHECKPOINT_PREFIX = "policy."
# The hyperparameter that marks a `BriefGRPO` checkpoint: the SFT model it started from.
SFT_DIR_HPARAM = "sft_dir"


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A training checkpoint that passed its history check and ``weights_only`` loading.

    Attributes:
        path: The checkpoint file.
        content: What ``torch.load(weights_only=True)`` returned.
        metrics: The metrics its ``checkpoint_history.json`` entry records (empty without one).
    """

    path: Path
    content: dict[str, Any]
    metrics: dict[str, float]


@dataclass(frozen=True)
class LoadedBriefModel:
    """A verified, loaded brief model export."""

    model: Any
    tokenizer: Any
    version: str
    manifest: ExportManifest


def export_brief_model(
    model: Any,
    tokenizer: Any,
    store: str | Path,
    *,
    step: int,
    source: str,
    metrics: Mapping[str, float] | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    make_current: bool = False,
) -> Path:
    """Write `model` and `tokenizer` to ``store/model_name/<seq>-step<step>/`` and return it.

    Args:
        model: A transformers causal LM (weights must be finite).
        tokenizer: Its tokenizer (saved beside it).
        store: The export store root (``exports/``).
        step: The training step the weights come from (in the version name and manifest).
        source: Where the weights come from (a checkpoint or model directory), recorded.
        metrics: Metrics at that step (e.g. reward, field score), recorded.
        model_name: The model line (one ``CURRENT`` per line).
        make_current: Point ``store/model_name/CURRENT`` at the new version.

    Raises:
        ExportError: A weight is not finite (nothing is written).
    """
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(
                f"weight {name!r} of {source} has non-finite values; export an earlier "
                "checkpoint (`lf-checkpoints list` shows the certified ones)"
            )
    root = Path(store) / model_name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        save_model(model, tokenizer, tmp)
        files = {
            p.name: FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
            for p in sorted(tmp.iterdir())
        }
        final = rename_export_into_place(tmp, root, step, files, source, metrics or {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported the brief model (step %d) to %s", step, final)
    if make_current:
        write_current(root, final.name)
    return final


def is_brief_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """Whether a loaded training checkpoint is the brief LLM's (a `BriefGRPO` names the SFT
    directory it started from in its hyperparameters; the PPO policy's never does)."""
    hparams = ckpt.get("hyper_parameters")
    return isinstance(hparams, Mapping) and SFT_DIR_HPARAM in hparams


def load_verified_checkpoint(ckpt_path: str | Path) -> VerifiedCheckpoint:
    """Check a checkpoint against its guard's history, then read it with ``weights_only=True``.

    The bytes are hashed before anything is unpickled: a checkpoint that ``lf-checkpoints
    verify`` calls CORRUPT (bit flip, truncation) must not become a fresh, valid-looking
    export. A checkpoint without a ``checkpoint_history.json`` beside it is read as it is.

    Raises:
        ExportError: Its history marks it corrupt, or its sha256 / size differ from the record.
        ModelLoadError: It is missing, unsafe (a pickle payload) or not a torch checkpoint.
    """
    source = Path(ckpt_path)
    if not source.is_file():
        raise ExportNotFoundError(f"checkpoint {source} does not exist")
    record = _history_entry(source)
    _verify_against_history(source, record)
    return VerifiedCheckpoint(
        path=source, content=load_checkpoint_safely(source), metrics=_metrics_from_history(record)
    )


def export_brief_checkpoint(
    ckpt_path: str | Path,
    store: str | Path,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    metrics: Mapping[str, float] | None = None,
    make_current: bool = False,
) -> Path:
    """Export the policy of a GRPO training checkpoint (what the rollback guard wrote).

    The same rules as the policy's ``serving.loading.export``, in this order, and nothing is
    written unless all pass: the checkpoint's sha256 against its ``checkpoint_history.json``
    record (when there is one); ``torch.load(weights_only=True)``; the SFT directory named in
    its hyperparameters (``sft_dir``: architecture and tokenizer) verified when it is an export
    itself (the shipped model); the weights' keys, shapes and dtypes against that architecture
    built on the meta device; finite weights. Only then is the SFT model read and the weights
    loaded into it.

    Args:
        ckpt_path: A `BriefGRPO` checkpoint.
        store: The export store root; the export goes to ``store/model_name/<seq>-step<step>/``.
        model_name: The model line.
        metrics: Recorded in the manifest; default: the checkpoint's history entry's metrics.
        make_current: Point ``store/model_name/CURRENT`` at the new version.

    Raises:
        ExportError: No ``sft_dir`` or policy weights, non-finite weights, or the history check.
        ModelLoadError: It is unsafe, unreadable, or its weights do not fit the architecture.
    """
    checkpoint = load_verified_checkpoint(ckpt_path)
    ckpt, source = checkpoint.content, checkpoint.path
    sft_dir = (ckpt.get("hyper_parameters") or {}).get(SFT_DIR_HPARAM)
    if not sft_dir or not Path(str(sft_dir)).is_dir():
        raise ExportError(
            f"{source} names no existing sft_dir ({sft_dir!r}) in its hyperparameters; it is "
            "not a BriefGRPO checkpoint, or its SFT directory moved"
        )
    state = {
        key[len(CHECKPOINT_PREFIX) :]: value
        for key, value in (ckpt.get("state_dict") or {}).items()
        if key.startswith(CHECKPOINT_PREFIX) and isinstance(value, torch.Tensor)
    }
    if not state:
        raise ExportError(f"{source} has no weights under {CHECKPOINT_PREFIX!r}")
    _check_against_architecture(Path(str(sft_dir)), state, source)
    _refuse_non_finite(state, source)
    model, tokenizer = load_model(str(sft_dir))
    model.load_state_dict(state, strict=True)
    return export_brief_model(
        model,
        tokenizer,
        store,
        step=int(ckpt.get("global_step", 0)),
        source=str(source.resolve()),
        metrics=checkpoint.metrics if metrics is None else metrics,
        model_name=model_name,
        make_current=make_current,
    )


def _check_against_architecture(
    sft_dir: Path, state: Mapping[str, torch.Tensor], source: Path
) -> None:
    """Keys, shapes and dtypes of `state` against the model `sft_dir/config.json` describes,
    built on the meta device: a checkpoint that declares another size is refused at no cost."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (sft_dir / MANIFEST_FILE).is_file():
        verify_brief_export(sft_dir)  # the tokenizer and config we copy must be the ones shipped
    config = AutoConfig.from_pretrained(str(sft_dir), trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        check_shapes(
            skeleton,
            {k: tuple(v.shape) for k, v in state.items()},
            {k: v.dtype for k, v in state.items()},
        )
    except StateDictMismatchError as error:
        raise StateDictMismatchError(
            f"{source}: {error} (the architecture of its sft_dir {sft_dir}); export a checkpoint "
            "of a run that started from this SFT model"
        ) from error


def copy_brief_export(
    directory: str | Path,
    store: str | Path,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    make_current: bool = False,
) -> Path:
    """Add a verified brief export (e.g. the model shipped in the package) to an export store
    as its next version, with the same step, source and metrics.

    The source is verified first (`verify_brief_export`: files, hashes, header against config)
    and the copies are hashed again against its manifest before the new version is renamed
    into place, so what a server loads is byte for byte what was verified.

    Raises:
        ModelLoadError: The source export does not verify, or a copy differs from it.
    """
    source = Path(directory)
    manifest = verify_brief_export(source)
    root = Path(store) / model_name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, entry in manifest.files.items():
            shutil.copyfile(source / name, tmp / name)
            if sha256_file(tmp / name) != entry.sha256:
                raise ChecksumMismatchError(
                    f"{source / name} changed while it was copied; copy it again"
                )
        final = rename_export_into_place(
            tmp,
            root,
            manifest.source_step,
            dict(manifest.files),
            manifest.source_checkpoint,
            manifest.metrics,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("copied the brief export %s to %s", source, final)
    if make_current:
        write_current(root, final.name)
    return final


# ----------------------------------------------------------------------------- loading


def read_brief_manifest(directory: Path) -> ExportManifest:
    """The export's manifest, validated; every file of the directory must be listed in it."""
    path = directory / MANIFEST_FILE
    _require_regular(path)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestInvalidError(f"{path} is over {MAX_MANIFEST_BYTES} bytes; re-export it")
    try:
        manifest = ExportManifest.model_validate_json(path.read_bytes())
    except ValueError as error:
        raise ManifestInvalidError(f"{path} is not a valid manifest: {error}") from error
    missing = [name for name in REQUIRED_FILES if name not in manifest.files]
    if missing:
        raise ManifestInvalidError(f"manifest of {directory} does not list {missing}")
    unlisted = sorted(
        p.name for p in directory.iterdir() if p.name not in {*manifest.files, MANIFEST_FILE}
    )
    if unlisted:
        raise UnsafeExportFileError(
            f"{directory} holds files its manifest does not list: {unlisted}; an export holds "
            "what lf-export wrote and nothing else. Remove them or re-export."
        )
    return manifest


def _require_regular(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError as error:
        raise IncompleteExportError(f"{path} is missing from the export") from error
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeExportFileError(
            f"{path} is not a regular file (a link, FIFO or device); nothing was read from it. "
            "Re-export the model."
        )


def verify_brief_export(directory: str | Path) -> ExportManifest:
    """Check files, sizes, sha256 and the weights' header against the architecture; read no
    tensor. Returns the manifest.

    Raises:
        ModelLoadError: A subclass naming what is wrong (see the module docstring).
    """
    path = Path(directory)
    manifest = read_brief_manifest(path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", manifest.version):
        raise ManifestInvalidError(f"manifest version {manifest.version!r} is not a plain name")
    for name, entry in manifest.files.items():
        file = path / name
        _require_regular(file)
        if file.stat().st_size != entry.bytes:
            raise ChecksumMismatchError(
                f"{file} has {file.stat().st_size} bytes, the manifest declares {entry.bytes}; "
                "it changed after export. Re-export it."
            )
        if sha256_file(file) != entry.sha256:
            raise ChecksumMismatchError(
                f"{file}: sha256 differs from the manifest's; the file changed after export. "
                "Re-export it."
            )
    _check_header_against_config(path)
    return manifest


def _check_header_against_config(path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ManifestInvalidError(
            f"{path}/config.json does not describe a model: {error}"
        ) from error
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    with (path / WEIGHTS_FILE).open("rb") as handle:
        header = read_safetensors_header(path / WEIGHTS_FILE, handle)
    shapes = dict(header.shapes)
    # Tied weights are stored once (lm_head.weight is the embedding): accept their absence.
    for tied, origin in (getattr(skeleton, "_tied_weights_keys", None) or {}).items():
        if isinstance(tied, str) and tied not in shapes and origin in shapes:
            shapes[tied] = shapes[origin]
    try:
        check_shapes(skeleton, shapes)
    except StateDictMismatchError as error:
        raise StateDictMismatchError(f"{path}: {error}") from error


def load_brief_export(directory: str | Path) -> LoadedBriefModel:
    """Verify (`verify_brief_export`), then load with ``from_pretrained`` (local, safetensors
    only, no remote code)."""
    path = Path(directory)
    manifest = verify_brief_export(path)
    model, tokenizer = load_model(path)
    model.eval()
    return LoadedBriefModel(
        model=model, tokenizer=tokenizer, version=manifest.version, manifest=manifest
    )


def export_summary(directory: str | Path) -> dict[str, Any]:
    """The manifest as a plain dict (for logs and the report)."""
    return dict(json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8")))
