"""Export Lightning checkpoints for serving, and load them back without running pickled code.

An export is a directory ``exports/<version>/`` holding three files:

- ``model.safetensors``: the state dict (safetensors: a JSON header plus raw buffers, no code path;
  research note §4: the Trail of Bits audit, header size capped against DoS).
- ``config.json``: the model class, named by a key of the allowlist in this module, and its
  hyperparameters (JSON primitives only).
- ``manifest.json``: sha256 and size of every file, the source checkpoint and step, the metrics at
  save, ``created_at`` and a schema version.

The export is written to a hidden temporary directory and renamed into place, so a reader sees
either no export or a complete one (research note §3.3: partially written checkpoints are the
most common "bad model" failure). Versions are zero-padded (``000012-step6000``) so that they sort
in time order, and ``exports/CURRENT`` names the version that should serve (DESIGN.md §7).

Loading never unpickles arbitrary objects: exports load from safetensors only; a raw ``.ckpt``
loads with ``torch.load(weights_only=True)`` and a refusal is reported, never retried with
``weights_only=False`` (research note §4: the Stanza fallback CVE).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal, overload

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

# The networks alone (torch): lightning_fragrance.rl loads PPO, and with it Lightning, lazily.
from lightning_fragrance.rl.networks import build_policy_net
from lightning_fragrance.serving.hot_reload import tensor_is_finite

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
SEQ_DIGITS = 6
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SEQ_RE = re.compile(rf"^(\d{{{SEQ_DIGITS}}})-")
# A store location with a scheme (``s3://bucket/exports``) is an fsspec URL, not a local path.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A manifest entry is a plain file name of the export directory (lf-export writes no
# subdirectories): no separator, no "..", no absolute path (issue 10: "../../etc/passwd").
_ENTRY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# manifest.json is the one file whose size no manifest declares (lf-export writes about 1 KB),
# and config.json is parsed whole (about 3 KB): neither may make a load read megabytes of JSON.
MAX_MANIFEST_BYTES = 1 << 20
MAX_CONFIG_BYTES = 1 << 20
_MAX_CURRENT_BYTES = 4096
# The safetensors library's own cap on the JSON header (its DoS guard, Trail of Bits audit).
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000

# --------------------------------------------------------------------------- errors


class InvalidVersionNameError(ValueError):
    """A version name that is not a plain directory name inside the export store."""


class ExportError(RuntimeError):
    """The checkpoint could not be exported (nothing was written to the store)."""


class ModelLoadError(RuntimeError):
    """Base of every failure to load an export; ``reload_result`` is the metric label.

    Attributes:
        reason: machine-readable cause (``checksum_mismatch``, ``state_dict_mismatch``, ...).
        reload_result: the ``model_reload_total{result}`` label this failure counts under.
    """

    reason = "load_failed"
    reload_result = "load_failed"

    def to_dict(self) -> dict[str, str]:
        """A structured description for API answers and reload records."""
        return {"type": type(self).__name__, "reason": self.reason, "message": str(self)}


class ExportNotFoundError(ModelLoadError):
    """The named version does not exist in the export store."""

    reason = "not_found"


class IncompleteExportError(ModelLoadError):
    """The export directory lacks a file that every complete export has."""

    reason = "incomplete"


class ManifestInvalidError(ModelLoadError):
    """``manifest.json`` or ``config.json`` is not valid for this schema version."""

    reason = "manifest_invalid"
    reload_result = "validation_failed"


class ChecksumMismatchError(ModelLoadError):
    """A file's sha256 differs from the one recorded in the manifest."""

    reason = "checksum_mismatch"
    reload_result = "validation_failed"


class ModelClassNotAllowedError(ModelLoadError):
    """``config.json`` names a model class that is not in the allowlist."""

    reason = "model_class_not_allowed"
    reload_result = "validation_failed"


class StateDictMismatchError(ModelLoadError):
    """The weights' keys or shapes do not match the model class built from the hyperparameters."""

    reason = "state_dict_mismatch"
    reload_result = "validation_failed"


class WeightsFormatError(ModelLoadError):
    """``model.safetensors`` cannot be parsed as safetensors (corrupt, truncated, or a pickle)."""

    reason = "weights_format"


class UnsafeExportFileError(ModelLoadError):
    """A manifest entry names a path outside the export, a symlink, or not a regular file.

    Nothing was read from it: a FIFO or ``/dev/zero`` would block or stream forever, and a
    file outside the export must not even have its checksum echoed back.
    """

    reason = "unsafe_file"
    reload_result = "validation_failed"


class UnsafeCheckpointError(ModelLoadError):
    """``torch.load(weights_only=True)`` refused the file: it holds objects other than weights."""

    reason = "unsafe_checkpoint"


# --------------------------------------------------------------------------- allowlist

ModelFactory = Callable[[Mapping[str, Any]], nn.Module]


@dataclass(frozen=True)
class ModelClass:
    """An allowlisted model class: how to build it, and which checkpoint keys are its weights.

    Attributes:
        factory: ``factory(hparams)`` builds the untrained module.
        state_dict_prefix: the prefix of its keys in the training module's state dict
            (``policy_net.`` for the PPO policy); stripped at export.
    """

    factory: ModelFactory
    state_dict_prefix: str = ""


def _policy_network(hparams: Mapping[str, Any]) -> nn.Module:
    module: nn.Module = build_policy_net(dict(hparams))
    return module


# Only these names may appear in config.json's "model_class": the loader never imports a module
# path read from a file (an export store is data; code comes from this package). The serving
# export holds the PPO policy alone: the critic (value_net) is a training-time object, and
# rebuilding the whole PPO module would construct its Gymnasium environment in the server.
_MODEL_CLASSES: dict[str, ModelClass] = {
    "lightning_fragrance.rl.PolicyNetwork": ModelClass(_policy_network, "policy_net."),
}
DEFAULT_MODEL_CLASS = "lightning_fragrance.rl.PolicyNetwork"


def register_model_class(name: str, factory: ModelFactory, state_dict_prefix: str = "") -> None:
    """Allow ``name`` in ``config.json``; ``factory(hparams)`` must build the untrained module.

    Registration is code, not data: an export can only name a class that the serving process
    itself registered.
    """
    _MODEL_CLASSES[name] = ModelClass(factory, state_dict_prefix)


def allowed_model_classes() -> list[str]:
    """The names that ``config.json`` may use for ``model_class``."""
    return sorted(_MODEL_CLASSES)


def _model_class(name: str) -> ModelClass:
    entry = _MODEL_CLASSES.get(name)
    if entry is None:
        raise ModelClassNotAllowedError(
            f"model class {name!r} is not allowlisted; allowed: {allowed_model_classes()}. "
            "Register it in code with lightning_fragrance.serving.loading.register_model_class."
        )
    return entry


def build_model(model_class: str, hparams: Mapping[str, Any]) -> nn.Module:
    """Build the allowlisted ``model_class`` from ``hparams``.

    Raises:
        ModelClassNotAllowedError: the name is not in the allowlist.
        ManifestInvalidError: the hyperparameters do not build the class.
    """
    entry = _model_class(model_class)
    try:
        return entry.factory(hparams)
    except (TypeError, ValueError, KeyError) as exc:
        raise ManifestInvalidError(
            f"hyperparameters do not build {model_class}: {type(exc).__name__}: {exc}"
        ) from exc


# --------------------------------------------------------------------------- records


class FileEntry(BaseModel):
    """One file of an export, as recorded in the manifest."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class ExportConfig(BaseModel):
    """``config.json``: which allowlisted class to build and with which hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    model_class: str
    hparams: dict[str, Any]


class ExportManifest(BaseModel):
    """``manifest.json``: what the export holds and where it came from."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    version: str
    files: dict[str, FileEntry]
    source_checkpoint: str
    source_step: int
    metrics: dict[str, float]
    created_at: str


@dataclass(frozen=True)
class LoadedModel:
    """A model built from an export, with the records that describe it."""

    model: nn.Module
    version: str
    config: ExportConfig
    manifest: ExportManifest


# --------------------------------------------------------------------------- file helpers


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def entry_path(directory: Path, name: str) -> Path:
    """The file a manifest entry names; refused unless it is a plain name inside ``directory``."""
    if not _ENTRY_RE.match(name):
        raise UnsafeExportFileError(
            f"manifest entry {name!r} is not a plain file name inside the export (no '/', "
            "'..' or absolute path); the manifest was edited or forged. Re-export with lf-export."
        )
    return directory / name


@contextlib.contextmanager
def _open_regular(path: Path, *, declared: int | None, limit: int) -> Iterator[BinaryIO]:
    """Open ``path`` for reading only if it is a regular file (not a symlink, FIFO or device).

    ``declared`` is the size the manifest records: any other size is refused before a byte is
    read. ``limit`` bounds files whose size nothing declares (``manifest.json``).
    """
    # O_NONBLOCK: opening a FIFO that has no writer blocks forever (issue 10: a reload stuck in
    # "loading"); O_NOFOLLOW: a symlink may point anywhere, exports never contain one.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise IncompleteExportError(f"{path} is missing from the export") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeExportFileError(
                f"{path} is a symbolic link; exports hold regular files only. Re-export it."
            ) from exc
        raise IncompleteExportError(f"{path} cannot be opened: {exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeExportFileError(
                f"{path} is not a regular file (mode {stat.filemode(info.st_mode)}); exports hold "
                "regular files only, and nothing was read from it. Re-export it."
            )
        os.set_blocking(fd, True)
        if declared is not None and info.st_size != declared:
            raise ChecksumMismatchError(
                f"{path} has {info.st_size} bytes, the manifest declares {declared}; the file "
                "changed after export. Re-export it."
            )
        if info.st_size > limit:
            raise ManifestInvalidError(
                f"{path} has {info.st_size} bytes, over the limit of {limit}; it is not a file "
                "lf-export wrote. Re-export it."
            )
        yield fh


def _sha256_of(fh: BinaryIO, size: int, chunk: int = 1 << 20) -> str:
    """The sha256 of the first ``size`` bytes of ``fh``: never reads past what was declared."""
    digest = hashlib.sha256()
    fh.seek(0)
    left = size
    while left > 0 and (block := fh.read(min(chunk, left))):
        digest.update(block)
        left -= len(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory entry is; not every OS lets us open a dir.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_text_durable(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def validate_version_name(name: str) -> str:
    """Return ``name`` if it is a plain version directory name, else raise.

    Rejects path separators, ``..``, URL schemes (``http:``, ``s3:``, ``file:``) and anything
    outside ``[A-Za-z0-9._-]``: the admin API names versions, never paths or URLs (research note
    §4: Lightning forces ``weights_only=False`` for http checkpoints; ShellTorch's SSRF register).

    Raises:
        InvalidVersionNameError: with the reason.
    """
    if not isinstance(name, str) or not name:
        raise InvalidVersionNameError("version name must be a non-empty string")
    if "/" in name or "\\" in name:
        raise InvalidVersionNameError(f"version name {name!r} contains a path separator")
    if ".." in name:
        raise InvalidVersionNameError(f"version name {name!r} contains '..'")
    if _SCHEME_RE.match(name) or "://" in name:
        raise InvalidVersionNameError(f"version name {name!r} looks like a URL; name a version")
    if not _VERSION_RE.match(name):
        raise InvalidVersionNameError(
            f"version name {name!r} must match {_VERSION_RE.pattern} (a directory in the store)"
        )
    return name


def is_store_url(location: str | Path) -> bool:
    """Whether ``location`` is an fsspec URL (``s3://bucket/exports``), not a local path."""
    return isinstance(location, str) and bool(_URL_RE.match(location))


# --------------------------------------------------------------------------- raw checkpoints


def load_checkpoint_safely(ckpt_path: str | Path) -> dict[str, Any]:
    """Load a Lightning ``.ckpt`` with ``torch.load(weights_only=True)``, never falling back.

    Raises:
        ExportNotFoundError: the file does not exist.
        UnsafeCheckpointError: the restricted unpickler refused an object (a pickle payload, or
            hyperparameters that are not primitives); the payload did not run.
        WeightsFormatError: the file is truncated or not a torch archive.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ExportNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} holds objects that torch.load(weights_only=True) refuses: {exc}. It was not "
            "unpickled. Keep hyperparameters primitive (save_hyperparameters of numbers/strings) "
            "or re-save the checkpoint from trusted code."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsFormatError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    if not isinstance(obj, dict):
        raise WeightsFormatError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


# --------------------------------------------------------------------------- export


def _primitive_hparams(hparams: Mapping[str, Any], source: Path) -> dict[str, Any]:
    try:
        text = json.dumps(dict(hparams), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ExportError(
            f"hyperparameters of {source} are not JSON primitives ({exc}); keep "
            "save_hyperparameters() to numbers, strings, bools, lists and dicts"
        ) from exc
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _history_entry(ckpt_path: Path) -> Mapping[str, Any] | None:
    """This checkpoint's entry in ``checkpoint_history.json`` beside it (DESIGN.md §4), if any."""
    history_path = ckpt_path.parent / "checkpoint_history.json"
    if not history_path.is_file():
        return None
    try:
        history = json.loads(history_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        log.warning("could not read %s; exporting without its record", history_path)
        return None
    entries = history
    if isinstance(history, dict):
        entries = history.get("entries", history.get("checkpoints", []))
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and Path(str(entry.get("file", ""))).name == ckpt_path.name:
            return entry
    return None


def _metrics_from_history(entry: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics recorded for this checkpoint in its history entry."""
    metrics = (entry or {}).get("metrics") or {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _verify_against_history(source: Path, entry: Mapping[str, Any] | None) -> None:
    """Refuse a checkpoint its history calls corrupt or whose bytes differ from the record.

    The same check ``lf-checkpoints verify`` runs (sha256 and size of the file), before the
    file is unpickled: a bit flip must not become a fresh, valid-looking export (issue 10).
    """
    if entry is None:
        return
    if entry.get("status") == "corrupt":
        raise ExportError(
            f"{source} is marked corrupt in {source.parent / 'checkpoint_history.json'} "
            f"({entry.get('note') or 'failed its integrity check'}); export another checkpoint "
            "(`lf-checkpoints list` shows the good ones)."
        )
    expected = str(entry.get("sha256") or "")
    if not expected:
        return  # an entry written before sha256s were recorded: nothing to compare with
    size = source.stat().st_size
    actual = sha256_file(source)
    expected_size = entry.get("bytes")
    if actual != expected or (isinstance(expected_size, int) and expected_size != size):
        raise ExportError(
            f"{source} fails its integrity check: sha256 {actual[:12]}... with {size} bytes, "
            f"its history records {expected[:12]}... with {expected_size} bytes (bit flip or "
            "truncation; `lf-checkpoints verify` calls it CORRUPT). Nothing was exported; "
            "export another checkpoint or restore this one."
        )


def _consolidate_sharded(source: Path, entry: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full checkpoint of a sharded checkpoint directory, assembled in this process with
    ``torch.distributed.checkpoint`` after every file matched its history sha256 (its
    ``.metadata`` is a pickle: nothing is read before)."""
    from lightning_fragrance.checkpointing.errors import CheckpointError
    from lightning_fragrance.checkpointing.sharded import consolidate_checkpoint

    if entry is not None and entry.get("status") == "corrupt":
        raise ExportError(
            f"{source} is marked corrupt in its checkpoint_history.json "
            f"({entry.get('note') or 'failed its integrity check'}); export another checkpoint."
        )
    try:
        return consolidate_checkpoint(source)
    except CheckpointError as exc:
        raise ExportError(f"{exc} Nothing was exported.") from exc


def _refuse_non_finite(tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    """A server refuses NaN/Inf weights at reload; refuse them here, before an export exists."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not tensor_is_finite(tensor):
            raise ExportError(
                f"{source}: weight {name!r} has non-finite values (NaN/Inf); a server would "
                "refuse this export at reload. Export an earlier checkpoint (`lf-checkpoints "
                "list` shows the certified ones)."
            )


def _next_sequence(out_dir: Path) -> int:
    return max((version_sequence(p.name) for p in out_dir.iterdir()), default=0) + 1


def version_name(sequence: int, step: int) -> str:
    """``000012-step6000``: the sequence zero-padded, so that names sort in time order."""
    return f"{sequence:0{SEQ_DIGITS}d}-step{step}"


def version_sequence(name: str) -> int:
    """The sequence number at the start of a version name (0 for a name without one)."""
    match = _SEQ_RE.match(name)
    return int(match.group(1)) if match else 0


@overload
def export(
    ckpt_path: str | Path,
    out_dir: Path,
    *,
    model_class: str = ...,
    metrics: Mapping[str, float] | None = ...,
    make_current: bool = ...,
) -> Path: ...


@overload
def export(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    model_class: str = ...,
    metrics: Mapping[str, float] | None = ...,
    make_current: bool = ...,
) -> Path | str: ...


def export(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    model_class: str = DEFAULT_MODEL_CLASS,
    metrics: Mapping[str, float] | None = None,
    make_current: bool = False,
) -> Path | str:
    """Export a Lightning checkpoint to ``out_dir/<seq>-step<step>/`` and return that path.

    The checkpoint is read with ``weights_only=True``; the state dict is checked against the
    allowlisted ``model_class`` built from the checkpoint's hyperparameters before anything is
    written, so an export that exists always loads.

    Args:
        ckpt_path: a Lightning checkpoint (``state_dict``, ``hyper_parameters``, ``global_step``),
            or a sharded checkpoint directory the guard wrote (FSDP2; consolidated offline).
        out_dir: the export store; created if missing. A URL (``s3://bucket/exports``) publishes
            to that object store instead (files first, manifest last; ``serving.object_store``)
            and returns the version's URL.
        model_class: allowlisted class recorded in ``config.json`` (default: the PPO policy;
            its weights are the checkpoint's ``policy_net.*`` entries).
        metrics: metrics at save; default: the checkpoint's entry in ``checkpoint_history.json``.
        make_current: also point ``out_dir/CURRENT`` at the new version.

    Raises:
        ExportError: the checkpoint lacks a state dict or its hyperparameters are not primitive,
            or the upload to an object store failed (nothing was published).
        ModelLoadError: the checkpoint is unsafe, unreadable, or does not fit ``model_class``.
    """
    source = Path(ckpt_path)
    if source.is_dir():  # a sharded checkpoint (FSDP2): every file verified, then consolidated
        record = _history_entry(source)
        ckpt = _consolidate_sharded(source, record)
    else:
        if not source.is_file():
            raise ExportNotFoundError(f"checkpoint {source} does not exist")
        record = _history_entry(source)
        _verify_against_history(source, record)
        ckpt = load_checkpoint_safely(source)
    state_dict = ckpt.get("state_dict")
    if not isinstance(state_dict, dict) or not state_dict:
        raise ExportError(f"{source} has no 'state_dict'; is it a Lightning checkpoint?")
    hparams = _primitive_hparams(ckpt.get("hyper_parameters") or {}, source)
    step = int(ckpt.get("global_step", 0))
    prefix = _model_class(model_class).state_dict_prefix
    tensors = {
        k[len(prefix) :]: v.detach().cpu().contiguous()
        for k, v in state_dict.items()
        if k.startswith(prefix) and isinstance(v, torch.Tensor)
    }
    if not tensors:
        raise ExportError(f"{source} has no weights under {prefix!r} for {model_class}")
    # Checked against a model built on the meta device: hyperparameters that describe a huge
    # model (hidden_sizes=[8000, 8000] beside 140 KB of weights) cost nothing to refuse.
    with torch.device("meta"):
        expected = build_model(model_class, hparams)
    check_state_dict(expected, tensors)
    _refuse_non_finite(tensors, source)
    config = ExportConfig(model_class=model_class, hparams=hparams)
    found = metrics if metrics is not None else _metrics_from_history(record)
    if is_store_url(out_dir):
        url = _publish_to_object_store(
            str(out_dir), config, tensors, step, str(source.resolve()), found, make_current
        )
        log.info("exported %s (step %d) to %s", source, step, url)
        return url

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        files = _write_export_files(tmp, config, tensors)
        final = rename_export_into_place(tmp, root, step, files, str(source.resolve()), found)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %d) to %s", source, step, final)
    if make_current:
        write_current(root, final.name)
    return final


def _write_export_files(
    tmp: Path, config: ExportConfig, tensors: Mapping[str, torch.Tensor]
) -> dict[str, FileEntry]:
    """Write ``config.json`` and ``model.safetensors`` into ``tmp``, durably; their entries."""
    _write_text_durable(tmp / CONFIG_FILE, config.model_dump_json(indent=2))
    save_file(dict(tensors), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    # One rule for every file of an export: the mode open() gives (0o666 minus the umask).
    # safetensors creates its file 0o600, which a server running as another user of the
    # group could not read.
    os.chmod(tmp / WEIGHTS_FILE, stat.S_IMODE((tmp / CONFIG_FILE).stat().st_mode))
    with (tmp / WEIGHTS_FILE).open("rb") as fh:
        os.fsync(fh.fileno())
    return {
        name: FileEntry(sha256=sha256_file(tmp / name), bytes=(tmp / name).stat().st_size)
        for name in (WEIGHTS_FILE, CONFIG_FILE)
    }


def _publish_to_object_store(
    url: str,
    config: ExportConfig,
    tensors: Mapping[str, torch.Tensor],
    step: int,
    source: str,
    metrics: Mapping[str, float],
    make_current: bool,
) -> str:
    """Stage the export locally, then upload it (``object_store.publish_export``)."""
    from lightning_fragrance.serving.object_store import publish_export  # imports this module

    with tempfile.TemporaryDirectory(prefix="lf-export-") as staging:
        files = _write_export_files(Path(staging), config, tensors)
        return publish_export(
            Path(staging), url, step, files, source, metrics, make_current=make_current
        )


def rename_export_into_place(
    tmp: Path,
    root: Path,
    step: int,
    files: dict[str, FileEntry],
    source: str,
    metrics: Mapping[str, float],
) -> Path:
    """Write the manifest into the finished temporary export ``tmp`` and rename it into
    ``root`` as the next version (``<seq>-step<step>``), durably. Shared by every model line's
    exporter (the policy here, the brief LLM in `lightning_fragrance.llm.export`)."""
    # The version name is decided at rename time; a concurrent export that took the same sequence
    # number makes the rename fail, and we take the next one (the manifest names the version).
    for _ in range(100):
        version = version_name(_next_sequence(root), step)
        manifest = ExportManifest(
            version=version,
            files=files,
            source_checkpoint=source,
            source_step=step,
            metrics={k: float(v) for k, v in metrics.items()},
            created_at=datetime.now(timezone.utc).isoformat(),
        )
        _write_text_durable(tmp / MANIFEST_FILE, manifest.model_dump_json(indent=2))
        _fsync_dir(tmp)
        final = root / version
        try:
            os.rename(tmp, final)
        except OSError:
            if final.exists():
                continue
            raise
        _fsync_dir(root)
        return final
    raise ExportError(f"could not find a free version name in {root}")


# --------------------------------------------------------------------------- CURRENT pointer


def write_current(root: str | Path, version: str) -> None:
    """Point ``root/CURRENT`` at ``version`` atomically (temp file, fsync, rename)."""
    validate_version_name(version)
    base = Path(root)
    tmp = base / f".{CURRENT_FILE}.{uuid.uuid4().hex}.tmp"
    _write_text_durable(tmp, version + "\n")
    os.replace(tmp, base / CURRENT_FILE)
    _fsync_dir(base)


def read_current(root: str | Path) -> str | None:
    """The version ``root/CURRENT`` names, or ``None`` when there is no valid pointer.

    Read like an export's files (a regular file, at most 4 KiB): a FIFO put there would
    otherwise block the watcher forever.
    """
    path = Path(root) / CURRENT_FILE
    try:
        with _open_regular(path, declared=None, limit=_MAX_CURRENT_BYTES) as fh:
            name = fh.read(_MAX_CURRENT_BYTES).decode("utf-8").strip()
        return validate_version_name(name)
    except (OSError, ModelLoadError, InvalidVersionNameError, UnicodeDecodeError):
        return None


# --------------------------------------------------------------------------- the store


class ExportStore:
    """The export directory: version listing, the CURRENT pointer, and safe loading.

    ``ExportStore(url)`` with an fsspec URL (``s3://bucket/exports``) returns the object-store
    variant, ``serving.object_store.ObjectStoreExports``: same methods, loading through a
    private local cache.

    Args:
        root: the directory ``export`` writes into, or an object store's URL.
        verify_checksums: recompute every file's sha256 on load (default ``True``).
    """

    def __new__(cls, root: str | Path, *args: Any, **kwargs: Any) -> ExportStore:
        # ``ExportStore("s3://bucket/exports")`` is the object-store variant, so that every
        # caller (the app, the brief line, scripts) takes a URL wherever it takes a directory.
        if cls is ExportStore and is_store_url(root):
            from lightning_fragrance.serving.object_store import ObjectStoreExports

            return super().__new__(ObjectStoreExports)
        return super().__new__(cls)

    def __init__(self, root: str | Path, *, verify_checksums: bool = True) -> None:
        self.root = Path(root)
        # Where the versions live, for messages: the directory, or the object store's URL.
        self.location = str(root)
        self.verify_checksums = verify_checksums
        self._reported_links: set[str] = set()

    def has_version(self, version: str) -> bool:
        """Whether ``version`` is a version directory of the store (complete or not)."""
        return self.path_for(version).is_dir()

    def fetch(self, version: str) -> Path:
        """The local directory of ``version`` (read in place here; the object-store variant
        downloads and verifies it first). For loaders that take a directory (the brief LLM)."""
        return self.path_for(version)

    def path_for(self, version: str) -> Path:
        """The directory of ``version``, guaranteed to lie inside the store (and not a link)."""
        validate_version_name(version)
        candidate = self.root / version
        if candidate.is_symlink():
            raise InvalidVersionNameError(
                f"version {version!r} is a symbolic link in {self.root}; versions are directories "
                "lf-export wrote there. Remove the link and export the model into the store."
            )
        path = candidate.resolve()
        if path.parent != self.root.resolve():
            raise InvalidVersionNameError(f"version {version!r} resolves outside {self.root}")
        return path

    def versions(self) -> list[str]:
        """Every version directory (complete or not), in name order.

        Hidden temp dirs are excluded, and so are symbolic links (logged once each): a link
        could point anywhere, and a version is what lf-export wrote into the store.
        """
        if not self.root.is_dir():
            return []
        names = []
        for entry in self.root.iterdir():
            if not _VERSION_RE.match(entry.name):
                continue
            if entry.is_symlink():
                self._report_link(entry)
            elif entry.is_dir():
                names.append(entry.name)
        return sorted(names)

    def _report_link(self, entry: Path) -> None:
        if entry.name not in self._reported_links:
            self._reported_links.add(entry.name)
            log.warning(
                "skipping %s: a symbolic link is not a version (it could point outside %s); "
                "remove it and export into the store",
                entry,
                self.root,
            )

    def complete_versions(self) -> list[str]:
        """Versions whose manifest is present and parses (checksums are checked on load)."""
        done = []
        for version in self.versions():
            with contextlib.suppress(ModelLoadError, InvalidVersionNameError):
                self.read_manifest(version)
                done.append(version)
        return done

    def newest(self) -> str | None:
        """The newest complete version, or ``None`` when the store has none."""
        complete = self.complete_versions()
        return complete[-1] if complete else None

    def current(self) -> str | None:
        """The version named by ``CURRENT``."""
        return read_current(self.root)

    def set_current(self, version: str) -> None:
        """Point ``CURRENT`` at ``version`` (which must exist)."""
        if not self.path_for(version).is_dir():
            raise ExportNotFoundError(f"export {version!r} not found in {self.root}")
        write_current(self.root, version)

    def read_manifest(self, version: str) -> ExportManifest:
        """Parse ``manifest.json`` of ``version`` (a regular file of at most 1 MiB)."""
        directory = self.path_for(version)
        if not directory.is_dir():
            raise ExportNotFoundError(
                f"export {version!r} not found in {self.root}; available: {self.versions()}"
            )
        path = directory / MANIFEST_FILE
        if not path.exists() and not path.is_symlink():
            raise IncompleteExportError(f"export {version!r} has no {MANIFEST_FILE}")
        with _open_regular(path, declared=None, limit=MAX_MANIFEST_BYTES) as fh:
            raw = fh.read(MAX_MANIFEST_BYTES)
        try:
            return ExportManifest.model_validate_json(raw)
        except ValidationError as exc:
            raise ManifestInvalidError(f"{path} is not a valid manifest: {exc}") from exc

    def load(self, version: str) -> LoadedModel:
        """Verify and load ``version``: checksums, config, allowlisted class, keys and shapes.

        Every check that can refuse the export runs before tensor data is read: entries are
        plain regular files of the declared sizes, the weights' header must match the model's
        keys, shapes and dtypes (a 1 GiB tensor in a sparse file is refused from its header),
        then the checksums, then the tensors.

        Raises:
            ModelLoadError: a subclass naming what is wrong; nothing is half-loaded.
        """
        manifest = self.read_manifest(version)
        directory = self.path_for(version)
        for required in (WEIGHTS_FILE, CONFIG_FILE):
            if required not in manifest.files:
                raise ManifestInvalidError(f"manifest of {version!r} does not list {required}")
        paths = {name: entry_path(directory, name) for name in manifest.files}
        config = self._read_config(version, paths[CONFIG_FILE], manifest.files[CONFIG_FILE])
        # Built on the meta device and given the loaded tensors (assign=True): no random init
        # and no second copy, so a reload holds old + new weights, not old + 2x new.
        with torch.device("meta"):
            model = build_model(config.model_class, config.hparams)
        weights_entry = manifest.files[WEIGHTS_FILE]
        with _open_regular(
            paths[WEIGHTS_FILE], declared=weights_entry.bytes, limit=weights_entry.bytes
        ) as fh:
            header = read_safetensors_header(paths[WEIGHTS_FILE], fh)
            check_shapes(model, header.shapes, header.dtypes)
            if self.verify_checksums:
                self._verify_checksums(version, manifest, paths, weights=fh)
            weights = header.read_tensors(fh)
        model.load_state_dict(weights, strict=True, assign=True)
        left_on_meta = [
            n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
        ]
        if left_on_meta:
            raise StateDictMismatchError(
                f"{config.model_class} has tensors the export does not provide: {left_on_meta[:5]}"
            )
        model.eval()
        return LoadedModel(model=model, version=version, config=config, manifest=manifest)

    def _read_config(self, version: str, path: Path, entry: FileEntry) -> ExportConfig:
        with _open_regular(path, declared=entry.bytes, limit=MAX_CONFIG_BYTES) as fh:
            raw = fh.read(entry.bytes)
            if self.verify_checksums:
                _check_sha256(version, CONFIG_FILE, hashlib.sha256(raw).hexdigest(), entry)
        try:
            return ExportConfig.model_validate_json(raw)
        except ValidationError as exc:
            raise ManifestInvalidError(f"{version}/{CONFIG_FILE} is invalid: {exc}") from exc

    def _verify_checksums(
        self,
        version: str,
        manifest: ExportManifest,
        paths: Mapping[str, Path],
        *,
        weights: BinaryIO,
    ) -> None:
        # The weights are hashed through the handle their tensors are then read from, so a
        # file renamed over them in between cannot slip in unchecked.
        for name, entry in manifest.files.items():
            if name == CONFIG_FILE:
                continue  # hashed from the very bytes that were parsed
            if name == WEIGHTS_FILE:
                _check_sha256(version, name, _sha256_of(weights, entry.bytes), entry)
                continue
            with _open_regular(paths[name], declared=entry.bytes, limit=entry.bytes) as fh:
                _check_sha256(version, name, _sha256_of(fh, entry.bytes), entry)


def _check_sha256(version: str, name: str, actual: str, entry: FileEntry) -> None:
    if actual != entry.sha256:
        raise ChecksumMismatchError(
            f"{version}/{name}: sha256 {actual[:12]}... differs from the manifest's "
            f"{entry.sha256[:12]}...; the file changed after export. Re-export it."
        )


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file: every tensor's dtype, shape and byte range.

    Attributes:
        path: the file (for messages).
        data_start: offset of the first tensor byte (8 + header length).
        entries: ``name -> (dtype, shape, (begin, end))``, offsets relative to ``data_start``.
    """

    path: Path
    data_start: int
    entries: Mapping[str, tuple[torch.dtype, tuple[int, ...], tuple[int, int]]]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``name -> shape``, as the header declares it."""
        return {name: shape for name, (_, shape, _) in self.entries.items()}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """``name -> dtype``, as the header declares it."""
        return {name: dtype for name, (dtype, _, _) in self.entries.items()}

    def read_tensors(self, fh: BinaryIO) -> dict[str, torch.Tensor]:
        """Read every tensor from ``fh`` into private, aligned memory.

        The bytes are read straight into freshly allocated tensors instead of being copied out
        of the library's memory map, because (measured with a 69 MB policy in
        ``bench_reload.py``) the mapped pages count in RSS while a reload holds the old model
        too: old + mapped file + copy is 3x one model, the read path keeps it near 2x. A model
        pointing into the map itself would crash with SIGBUS if the export were overwritten,
        and map views are not 64-byte aligned, which changes the matmul kernels' summation order.
        """
        try:
            return {
                name: _read_tensor(fh, self.data_start, dtype, shape, offsets)
                for name, (dtype, shape, offsets) in self.entries.items()
            }
        except (OSError, ValueError) as exc:
            raise WeightsFormatError(f"{self.path}: {exc}; re-export it with lf-export") from exc


def read_safetensors_header(path: Path, fh: BinaryIO) -> SafetensorsHeader:
    """Validate ``path`` as safetensors and parse its header from ``fh``; no tensor data is read.

    The safetensors library validates the file first (header size cap, dtypes, offsets that
    tile the buffer: a pickle or a truncated file fails here) by mapping it, which reads the
    header only. Anything else is refused, never unpickled.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
        fh.seek(0)
        header_len = int.from_bytes(fh.read(8), "little")
        if header_len > MAX_SAFETENSORS_HEADER_BYTES:
            raise ValueError(f"header of {header_len} bytes is over {MAX_SAFETENSORS_HEADER_BYTES}")
        header = json.loads(fh.read(header_len))
        entries = {name: _header_entry(header[name]) for name in names}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsFormatError(
            f"{path} is not a valid safetensors file ({exc}); exports are read as safetensors "
            "only and never unpickled. Re-export the checkpoint with lf-export."
        ) from exc
    return SafetensorsHeader(path=path, data_start=8 + header_len, entries=entries)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file (a regular file, never a link or FIFO) into tensors."""
    size = path.stat().st_size
    with _open_regular(path, declared=size, limit=size) as fh:
        return read_safetensors_header(path, fh).read_tensors(fh)


def _header_entry(info: Mapping[str, Any]) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    dtype = _SAFETENSORS_DTYPES.get(str(info["dtype"]))
    if dtype is None:
        raise ValueError(f"dtype {info['dtype']!r} is not one of {sorted(_SAFETENSORS_DTYPES)}")
    shape = tuple(int(d) for d in info["shape"])
    begin, end = (int(x) for x in info["data_offsets"])
    return dtype, shape, (begin, end)


def _read_tensor(
    fh: BinaryIO,
    base: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    offsets: tuple[int, int],
) -> torch.Tensor:
    tensor = torch.empty(list(shape), dtype=dtype)
    begin, end = offsets
    raw = tensor.reshape(-1).view(torch.uint8)  # safetensors and x86/ARM are little-endian
    if raw.numel() != end - begin:
        raise ValueError(f"tensor bytes {end - begin} do not match its shape and dtype")
    if raw.numel():
        fh.seek(base + begin)
        if fh.readinto(raw.numpy().data) != raw.numel():  # type: ignore[attr-defined]
            raise ValueError("file ends inside a tensor")
    return tensor


def check_state_dict(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Raise ``StateDictMismatchError`` unless keys and shapes match ``model`` exactly."""
    check_shapes(model, {k: tuple(v.shape) for k, v in weights.items()})


def check_shapes(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> None:
    """Raise ``StateDictMismatchError`` unless keys, shapes (and dtypes) match ``model``.

    Works on a model built on the meta device: nothing is allocated, so an export or a
    checkpoint that declares huge tensors is refused at the cost of its header.
    """
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    both = set(expected) & set(shapes)
    wrong_shapes = sorted(
        f"{k}: expected {expected[k]}, got {shapes[k]}" for k in both if expected[k] != shapes[k]
    )
    wrong_dtypes = sorted(
        f"{k}: expected {state[k].dtype}, got {dtypes[k]}"
        for k in both
        if dtypes is not None and k in dtypes and state[k].dtype != dtypes[k]
    )
    if missing or unexpected or wrong_shapes or wrong_dtypes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if wrong_shapes:
            parts.append(f"shape mismatch {wrong_shapes[:5]}")
        if wrong_dtypes:
            parts.append(f"dtype mismatch {wrong_dtypes[:5]}")
        raise StateDictMismatchError(
            f"weights do not fit {type(model).__name__}: " + "; ".join(parts)
        )
