"""Do all ranks see the same checkpoint directory? Checked once, when a multi-rank run starts.

Rank 0 writes every checkpoint; the other ranks read the files it wrote whenever a rollback
cannot come from their in-memory snapshot (an escalation to an older save, snapshot off by the
memory budget, a resume). On several nodes a path such as ``/local/ckpt`` names a different disk
on each node: rank 0's saves succeed, and the first file rollback fails on the other nodes
(or, worse, finds a stale history of another run there) in the middle of a recovery. So right
after rank 0 claimed the directory, each rank reads the history through its own filesystem view
and checks that it names this run; the adapters gather the answers and every rank raises the
same error before the first step. Pure: the collectives belong to the adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_fragrance.checkpointing.errors import CheckpointError
from lightning_fragrance.checkpointing.store import CheckpointStore


def sees_run(store: CheckpointStore, run_id: str) -> bool:
    """Whether this rank reads, in ``store``, the history rank 0 just claimed for ``run_id``."""
    try:
        store.refresh()
    except (CheckpointError, OSError):  # unreadable here: not the directory rank 0 wrote
        return False
    return store.run_id == run_id


def blindness(rank: int, world_size: int, sees: bool) -> list[float]:
    """This rank's contribution to one ``max`` all-reduce: 1.0 at its own index if it does not
    see the directory, zeros elsewhere (the reduced vector names every blind rank, with the
    same collective the readings' agreement uses)."""
    vector = [0.0] * world_size
    vector[rank] = 0.0 if sees else 1.0
    return vector


def blind_ranks(reduced: Sequence[float]) -> list[int]:
    """The ranks a reduced `blindness` vector marks."""
    return [rank for rank, flag in enumerate(reduced) if flag > 0.0]


def not_shared_message(owner: str, directory: str, ranks: Sequence[int], world_size: int) -> str:
    """The error every rank raises when ``ranks`` do not see rank 0's checkpoint directory."""
    names = ", ".join(str(r) for r in ranks)
    return (
        f"{owner}: rank(s) {names} of {world_size} do not see the checkpoint history rank 0 "
        f"just wrote in {directory}: the path names a different directory on their machine "
        "(a node-local disk, or a relative path resolved from another working directory). "
        "Rank 0 writes every checkpoint and the other ranks read those files on a rollback "
        "that does not come from memory, so every rank must see the same directory: use a "
        "filesystem shared by all nodes (NFS, Lustre, a mounted bucket) or an object store "
        "URL (dirpath='s3://bucket/run/checkpoints'), given as an absolute path."
    )
