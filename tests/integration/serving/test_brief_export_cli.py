"""`lf-export` on brief LLM checkpoints, as a user runs it: the real console script in a
subprocess, a real `BriefGRPO` checkpoint written by the rollback guard during a real fit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from serving_server import REPO

from lightning_fragrance.llm.export import load_brief_export
from lightning_fragrance.llm.model import BriefModelSize
from lightning_fragrance.serving.loading import read_current

pytestmark = [pytest.mark.integration]

LF_EXPORT = Path(sys.executable).parent / "lf-export"


@dataclass(frozen=True)
class GuardRun:
    """A finished tiny GRPO run: its newest guard checkpoint and the policy it ended with."""

    checkpoint: Path
    policy: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def guard_run(tmp_path_factory: pytest.TempPathFactory) -> GuardRun:
    """A tiny SFT model, then 2 GRPO updates under `RollbackCheckpoint` (a save per update)."""
    import lightning.pytorch as pl

    from lightning_fragrance.callbacks import RollbackCheckpoint
    from lightning_fragrance.llm.grpo import BriefGRPO
    from lightning_fragrance.llm.sft import SFTSettings, run_sft

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("brief_run")
    size = BriefModelSize(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    )
    sft = run_sft(
        SFTSettings(n_train=64, n_val=16, vocab_size=600, size=size, max_steps=4, batch_size=16),
        out,
    )
    module = BriefGRPO(
        sft_dir=str(sft.model_dir), n_prompts=8, prompts_per_step=2, group_size=2, max_new_tokens=8
    )
    guard = RollbackCheckpoint(dirpath=str(out / "checkpoints"), save_every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    trainer.fit(module)
    guard.flush()
    newest = max((out / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(newest, map_location="cpu", weights_only=True)["state_dict"]
    policy = {k[len("policy.") :]: v for k, v in state.items() if k.startswith("policy.")}
    return GuardRun(checkpoint=newest, policy=policy)


def lf_export(*args: str) -> subprocess.CompletedProcess[str]:
    assert LF_EXPORT.is_file(), f"{LF_EXPORT} is missing: `pip install -e .` installs lf-export"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(LF_EXPORT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=150
    )


def copy_run(run: GuardRun, into: Path) -> Path:
    """The checkpoint and its history, copied (a test tampers with the copy)."""
    into.mkdir()
    shutil.copy2(run.checkpoint.parent / "checkpoint_history.json", into)
    return Path(shutil.copy2(run.checkpoint, into))


def test_lf_export_detects_a_brief_checkpoint_and_writes_a_loadable_versioned_export(
    guard_run: GuardRun, tmp_path: Path
) -> None:
    root = tmp_path / "exports"
    done = lf_export(f"ckpt_path={guard_run.checkpoint}", f"export_dir={root}", "make_current=true")
    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == root / "brief_llm" / "000001-step2"
    assert read_current(root / "brief_llm") == "000001-step2"
    assert read_current(root) is None  # the policy line is not touched
    loaded = load_brief_export(path)
    weights = loaded.model.state_dict()
    assert all(torch.equal(guard_run.policy[k], weights[k]) for k in weights)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["source_checkpoint"] == str(guard_run.checkpoint.resolve())
    assert manifest["source_step"] == 2

    # Said explicitly, the same checkpoint becomes the next version; CURRENT stays.
    again = lf_export(
        f"ckpt_path={guard_run.checkpoint}", f"export_dir={root}", "model_line=brief_llm"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert Path(again.stdout.strip().splitlines()[-1]).name == "000002-step2"
    assert read_current(root / "brief_llm") == "000001-step2"


def test_a_checkpoint_whose_bytes_differ_from_its_history_exits_2_and_writes_nothing(
    guard_run: GuardRun, tmp_path: Path
) -> None:
    checkpoint = copy_run(guard_run, tmp_path / "run")
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    checkpoint.write_bytes(bytes(data))
    root = tmp_path / "exports"
    done = lf_export(f"ckpt_path={checkpoint}", f"export_dir={root}", "make_current=true")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "fails its integrity check" in done.stderr
    assert "Traceback" not in done.stderr
    assert not root.exists()


class _Payload:
    """Unpickling this would create `marker`: what a malicious checkpoint would run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_with_a_pickle_payload_is_refused_without_running_it(
    guard_run: GuardRun, tmp_path: Path
) -> None:
    content = torch.load(guard_run.checkpoint, map_location="cpu", weights_only=True)
    marker = tmp_path / "payload-ran"
    content["hyper_parameters"]["note"] = _Payload(marker)
    checkpoint = tmp_path / "evil.ckpt"
    torch.save(content, checkpoint)
    root = tmp_path / "exports"
    done = lf_export(f"ckpt_path={checkpoint}", f"export_dir={root}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "weights_only=True" in done.stderr and "was not unpickled" in done.stderr
    assert not marker.exists()
    assert not root.exists()


def test_non_finite_or_misshapen_brief_weights_exit_2_and_write_nothing(
    guard_run: GuardRun, tmp_path: Path
) -> None:
    content = torch.load(guard_run.checkpoint, map_location="cpu", weights_only=True)
    state = content["state_dict"]
    state["policy.model.norm.weight"] = torch.full_like(state["policy.model.norm.weight"], 1.0)
    state["policy.model.norm.weight"][0] = float("nan")
    torch.save(content, tmp_path / "nan.ckpt")
    state["policy.model.norm.weight"] = torch.ones(7)
    torch.save(content, tmp_path / "shape.ckpt")
    root = tmp_path / "exports"

    nan = lf_export(f"ckpt_path={tmp_path / 'nan.ckpt'}", f"export_dir={root}")
    assert nan.returncode == 2, nan.stderr[-3000:]
    assert "'model.norm.weight' has non-finite values" in nan.stderr
    shape = lf_export(f"ckpt_path={tmp_path / 'shape.ckpt'}", f"export_dir={root}")
    assert shape.returncode == 2, shape.stderr[-3000:]
    assert "shape mismatch" in shape.stderr and "model.norm.weight" in shape.stderr
    assert not root.exists()


def test_model_line_brief_llm_on_a_policy_checkpoint_exits_2_naming_what_is_missing(
    ppo_checkpoints: list[Path], tmp_path: Path
) -> None:
    root = tmp_path / "exports"
    ckpt = f"ckpt_path={ppo_checkpoints[1]}"
    done = lf_export(ckpt, f"export_dir={root}", "model_line=brief_llm")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "names no existing sft_dir" in done.stderr
    assert not root.exists()
    # Detected, the same checkpoint exports to the policy line as before.
    auto = lf_export(ckpt, f"export_dir={root}")
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert Path(auto.stdout.strip().splitlines()[-1]) == root / "000001-step2"


def test_lf_export_publishes_a_brief_checkpoint_to_an_object_store(
    guard_run: GuardRun, tmp_path: Path
) -> None:
    """moto in server mode on 127.0.0.1 stands in for S3 (`moto_s3.py`): the real `lf-export`
    reaches it through the standard AWS_* settings, as it would reach S3."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpointing"))
    from moto_s3 import client_environment, moto_server, require_moto

    require_moto()
    import s3fs

    from lightning_fragrance.serving.object_store import ObjectStoreExports

    with moto_server() as endpoint:
        settings = client_environment(endpoint)
        client = s3fs.S3FileSystem(
            key=settings["AWS_ACCESS_KEY_ID"],
            secret=settings["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=endpoint,
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        client.mkdir("models")
        env = {**os.environ, **settings, "PYTHONWARNINGS": "ignore"}
        args = ["export_dir=s3://models/exports", "make_current=true"]
        done = subprocess.run(
            [str(LF_EXPORT), f"ckpt_path={guard_run.checkpoint}", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        url = done.stdout.strip().splitlines()[-1]
        version = url.rstrip("/").rsplit("/", 1)[-1]
        assert url == f"s3://models/exports/brief_llm/{version}"
        # CURRENT on the store names it, and a reader that downloads and verifies it gets the
        # policy the guard's checkpoint holds, bit for bit.
        store = ObjectStoreExports("models/exports/brief_llm", fs=client)
        assert store.current() == version
        loaded = load_brief_export(store.fetch(version))
        for name, tensor in guard_run.policy.items():
            assert torch.equal(loaded.model.state_dict()[name], tensor), name
