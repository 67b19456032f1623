"""Reading what each rank saved in a sharded (DCP) checkpoint, for the FSDP2 tests of the
Trainer (`sharded/`) and of Fabric (`fabric/`).

Only checkpoints whose files matched the history are opened: DCP's `.metadata` is a pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from lightning_fragrance.checkpointing import CheckpointStore


def history_entries(out: Path) -> dict[int, dict[str, Any]]:
    """The history's entries of ``out/checkpoints``, by step."""
    history = json.loads((out / "checkpoints" / "checkpoint_history.json").read_text())
    return {int(e["step"]): e for e in history["entries"]}


def verified_metadata(out: Path, step: int) -> Metadata:
    """DCP's metadata of an intact checkpoint, read (it is a pickle) after its sha256 matched."""
    store = CheckpointStore(str(out / "checkpoints"), read_only=True)
    record = store.record(step)
    assert record is not None and record.sharded
    store.verify_files(record)
    return dcp.FileSystemReader(str(out / "checkpoints" / record.file)).read_metadata()


def rank_chunks(metadata: Metadata, rank: int) -> Iterator[tuple[str, Any]]:
    """(fqn, chunk) of every tensor chunk stored in ``rank``'s file."""
    for index, info in metadata.storage_data.items():
        if info.relative_path == f"__{rank}_0.distcp":
            stored = metadata.state_dict_metadata[index.fqn]
            if isinstance(stored, TensorStorageMetadata):  # not the pickled param_groups
                yield index.fqn, stored.chunks[index.index or 0]


def saved_local_shards(
    out: Path, step: int, rank: int, model_key: str, optimizer_key: str
) -> dict[str, torch.Tensor]:
    """What ``rank`` saved at ``step``: the chunk of each weight (``<param>``) and Adam moment
    (``<moment>.<param>``) stored in that rank's file, cut from the tensors assembled from all
    files. ``model_key`` / ``optimizer_key``: where the strategy put them (the Trainer's
    ``state_dict`` / ``optimizer_0``, Fabric's state keys)."""
    metadata = verified_metadata(out, step)
    full = {
        fqn: torch.empty(tuple(info.size), dtype=info.properties.dtype)
        for fqn, info in metadata.state_dict_metadata.items()
        if isinstance(info, TensorStorageMetadata)
    }
    path = str(out / "checkpoints" / f"checkpoint_step_{step}")
    dcp.load(full, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    weights, moments = f"{model_key}.", f"{optimizer_key}.state."
    shards: dict[str, torch.Tensor] = {}
    for fqn, chunk in rank_chunks(metadata, rank):
        cut = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
        if fqn.startswith(weights):
            shards[fqn.removeprefix(weights)] = full[fqn][cut]
        elif fqn.startswith(moments) and fqn.rsplit(".", 1)[1] != "step":
            param, moment = fqn.removeprefix(moments).rsplit(".", 1)
            shards[f"{moment}.{param}"] = full[fqn][cut]
    return shards
