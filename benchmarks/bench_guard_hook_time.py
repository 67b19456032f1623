"""Time the guard spends inside its Lightning hooks on the reference task, per update.

Claim (issue 9): on the fragrance PPO task with the default guard (rollback_ppo.yaml, a save
every 25 updates), the time inside `RollbackCheckpoint`'s hooks is <= 0.5% of the update time,
with per-update and with per-epoch logging.

Method: every hook of the callback instance is wrapped by a timer in this script (not the
guard's own timers), so staging copies, waits for the writer (back-pressure, the final flush in
``teardown``) and the judging all count. The anchor is the update itself: the fit's wall time
divided by its updates, measured in the same run. One process, one torch thread.

Run: ``python benchmarks/bench_guard_hook_time.py`` (about a minute).
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from lightning_fragrance.callbacks import RollbackCheckpoint
from lightning_fragrance.cli.train import build_components, find_config_dir

UPDATES = 150
TARGET = 0.005
HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_validation_end",
    "on_save_checkpoint",
    "state_dict",
    "teardown",
)


def timed(guard: RollbackCheckpoint, spent: dict[str, float]) -> None:
    """Replace each hook on the instance with a timing wrapper (Lightning looks hooks up on the
    instance, so the wrapper is what it calls)."""
    for name in HOOKS:
        hook: Callable[..., Any] = getattr(guard, name)

        @functools.wraps(hook)
        def wrapper(*args: Any, _hook: Callable[..., Any] = hook, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                name = _hook.__name__
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - started

        setattr(guard, name, wrapper)


def measure(logging: str) -> tuple[dict[str, float], float, int]:
    overrides = [
        f"trainer.max_steps={UPDATES}",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "report.enabled=false",
    ]
    if logging == "on_epoch":
        overrides += ["model.log_on_epoch=true", "model.updates_per_epoch=5"]
    with (
        tempfile.TemporaryDirectory() as tmp,
        initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"),
    ):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp}", *overrides])
        module, trainer, _, callbacks = build_components(cfg)
        [guard] = [c for c in callbacks if isinstance(c, RollbackCheckpoint)]
        spent: dict[str, float] = {}
        timed(guard, spent)
        started = time.perf_counter()
        trainer.fit(module)
        total = time.perf_counter() - started
        saves = len(guard.history)
    return spent, total, saves


def main() -> int:
    torch.set_num_threads(1)
    ok = True
    print(f"fragrance PPO, {UPDATES} updates, default guard (rollback_ppo.yaml)")
    for logging in ("on_step", "on_epoch"):
        spent, total_s, saves = measure(logging)
        guard_s = sum(spent.values())
        per_update = total_s / UPDATES
        share = guard_s / total_s
        print(f"  {logging}:")
        print(
            f"    ours   : {guard_s * 1e3 / UPDATES:.3f} ms per update inside the guard's hooks "
            f"({saves} saves, staging and flush waits included)"
        )
        print(f"    anchor : {per_update * 1e3:.1f} ms per update (the fit's wall time / updates)")
        print(f"    ratio  : {share:.4%} of the update time; target <= {TARGET:.1%}")
        top = sorted(spent.items(), key=lambda kv: -kv[1])[:4]
        print("    where  : " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in top))
        ok = ok and share <= TARGET
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
