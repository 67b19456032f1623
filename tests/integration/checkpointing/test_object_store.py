"""Checkpoints on an S3-compatible object store: commit, sha256, retention, rollback and resume
from it, and an upload cut midway.

moto stands in for S3: `moto_s3.moto_server` runs it in server mode, a real S3-protocol HTTP
server on 127.0.0.1, and everything under test reaches it as it would reach S3 (fsspec + s3fs,
an endpoint URL and credentials from the environment, Lightning's own ``ckpt_path`` loading).
Listings are checked through a second, uncached client, as another machine would see them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from moto_s3 import (
    new_bucket,
    observer_client,
    s3_session,
    severable_client,
)
from moto_s3 import require_moto as _require_moto
from torch import nn

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.checkpointing import CheckpointManager, NullObserver
from lightning_fragrance.checkpointing.store import HISTORY_FILE
from lightning_fragrance.examples import DivergenceSpec, ToyPolicyModule, toy_dataloader

_require_moto()
import s3fs  # noqa: E402  (after the check: a missing s3fs fails on CI with the way out)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_session() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    return new_bucket()


def _net_and_optimizer(width: int = 8) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = nn.Linear(width, width)
    return net, torch.optim.Adam(net.parameters(), lr=1e-2)


def _train_step(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(16, net.in_features)
    loss = (net(x) - x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _healthy_steps(
    manager: CheckpointManager,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
) -> dict[int, dict[str, torch.Tensor]]:
    """Run healthy steps; returns the weights of each step that was saved."""
    saved = {}
    for step in steps:
        _train_step(net, optimizer)
        manager.check_rollback(step, 0.5, 1.0, 0.001)
        if manager.should_save(step):
            manager.save_checkpoint(step, net, None, optimizer, 0.5, 1.0, 0.001)
            saved[step] = {k: v.clone() for k, v in net.state_dict().items()}
    return saved


def _listing(bucket: str, run: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in observer_client().ls(f"{bucket}/{run}"))


def _history(bucket: str, run: str) -> dict[str, Any]:
    return json.loads(observer_client().cat_file(f"{bucket}/{run}/{HISTORY_FILE}"))


def test_checkpoints_commit_to_s3_with_their_sha256_and_retention(bucket: str) -> None:
    manager = CheckpointManager(f"s3://{bucket}/run", save_interval=2, max_checkpoints=2)
    net, optimizer = _net_and_optimizer()
    _healthy_steps(manager, net, optimizer, range(1, 9))
    manager.close()

    entries = _history(bucket, "run")["entries"]
    # Retention kept the newest two; the store holds exactly the listed objects, no *.tmp.
    assert [e["step"] for e in entries] == [6, 8]
    assert _listing(bucket, "run") == sorted([HISTORY_FILE] + [e["file"] for e in entries])
    for entry in entries:
        data = observer_client().cat_file(f"{bucket}/run/{entry['file']}")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]


def test_a_rollback_reads_the_store_and_skips_a_bit_flipped_object(bucket: str) -> None:
    manager = CheckpointManager(
        f"s3://{bucket}/run", save_interval=2, keep_in_memory=False, async_save=False
    )
    net, optimizer = _net_and_optimizer()
    saved = _healthy_steps(manager, net, optimizer, range(1, 6))
    assert sorted(saved) == [1, 2, 4]
    client, newest = observer_client(), f"{bucket}/run/checkpoint_step_4.ckpt"
    data = bytearray(client.cat_file(newest))
    data[len(data) // 2] ^= 0xFF
    client.pipe_file(newest, bytes(data))

    _train_step(net, optimizer)
    should_rollback, target, _ = manager.check_rollback(6, 100.0, 1.0, 0.001)
    assert should_rollback and target is not None and target.step == 4
    restored = manager.rollback(net, None, optimizer)

    assert restored is not None and restored.step == 2  # step 4 failed its sha256
    for key, tensor in saved[2].items():
        assert torch.equal(net.state_dict()[key], tensor), key
    statuses = {e["step"]: e["status"] for e in _history(bucket, "run")["entries"]}
    assert statuses[4] == "corrupt"
    manager.close()


def test_a_manager_resumes_its_run_from_the_store_and_rolls_back_to_it(bucket: str) -> None:
    first = CheckpointManager(f"s3://{bucket}/run", save_interval=2)
    net, optimizer = _net_and_optimizer()
    saved = _healthy_steps(first, net, optimizer, range(1, 6))  # step 5 certifies step 4
    first.close()
    s3fs.S3FileSystem.clear_instance_cache()  # a new process starts with a new client

    resumed = CheckpointManager(f"s3://{bucket}/run", save_interval=2, resume=True)
    assert resumed.store.run_id == first.store.run_id
    assert [r.step for r in resumed.list_checkpoints()] == [1, 2, 4]
    net2, optimizer2 = _net_and_optimizer()
    _train_step(net2, optimizer2)
    assert resumed.check_rollback(6, 100.0, 1.0, 0.001).should_rollback
    restored = resumed.rollback(net2, None, optimizer2)
    assert restored is not None and restored.step == 4  # the first run's file, from the store
    for key, tensor in saved[4].items():
        assert torch.equal(net2.state_dict()[key], tensor), key
    resumed.close()


def _trainer(guard: RollbackCheckpoint, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def test_trainer_rolls_back_from_s3_and_resumes_from_an_s3_ckpt_path(bucket: str) -> None:
    url = f"s3://{bucket}/checkpoints"
    guard = RollbackCheckpoint(dirpath=url, save_every_n_steps=4, keep_in_memory=False)
    module = ToyPolicyModule(divergence=DivergenceSpec(at_step=6, kl=0.5, loss_scale=1.0))
    _trainer(guard, max_steps=10).fit(module, toy_dataloader())
    moves = [(e["at_step"], e["to_step"], e["from_memory"]) for e in guard.rollback_events]
    assert moves == [(7, 4, False)]  # read back from the object store

    resumed = RollbackCheckpoint(dirpath=url, save_every_n_steps=4)
    trainer = _trainer(resumed, max_steps=12)
    # Lightning opens the s3:// path itself (fsspec), with the same environment settings.
    trainer.fit(ToyPolicyModule(), toy_dataloader(), ckpt_path=f"{url}/checkpoint_step_8.ckpt")
    assert trainer.global_step == 12 and resumed.rollback_count == 1
    history = _history(bucket, "checkpoints")
    assert history["run_id"] == guard.guard.run_id
    assert 12 in [e["step"] for e in history["entries"]]


class _Errors(NullObserver):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_checkpoint_error(self, step: int, error: BaseException) -> None:
        self.steps.append(step)


def test_an_upload_cut_midway_leaves_no_listed_checkpoint_and_training_goes_on(
    bucket: str,
) -> None:
    proxy, fs = severable_client()
    errors = _Errors()
    manager = CheckpointManager(
        f"{bucket}/run", save_interval=2, observers=[errors], fs=fs, async_save=False
    )
    net, optimizer = _net_and_optimizer(width=256)  # ~0.8 MB per checkpoint
    try:
        _healthy_steps(manager, net, optimizer, range(1, 2))  # step 1 committed
        proxy.sever_after(64 * 1024)  # the next upload loses the network after 64 KB
        _healthy_steps(manager, net, optimizer, range(2, 3))
        proxy.heal()
        _healthy_steps(manager, net, optimizer, range(3, 5))  # step 4 committed
    finally:
        manager.close()
        proxy.close()

    assert errors.steps == [2]
    assert [e["step"] for e in _history(bucket, "run")["entries"]] == [1, 4]
    assert _listing(bucket, "run") == sorted(
        [HISTORY_FILE, "checkpoint_step_1.ckpt", "checkpoint_step_4.ckpt"]
    )
