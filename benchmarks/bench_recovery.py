"""Recovery from an injected divergence, wherever it lands and however the metrics are logged.

Part 1 (one seed): the same lr x100 fault with the guard, without it, and a clean run; plus the
false rollbacks of a healthy run with the default guard (rollback_ppo.yaml).

Part 2 (the sweep): the fault position moves across one save interval (8 positions), the PPO
module logs per update (``on_step``) or once per epoch of 5 updates (``on_epoch``, as many RL
examples do: the guard only sees the damage at the epoch's end), 3 seeds. Every cell is scored
by a greedy evaluation of the final policy on the same 300 fresh briefs, against the clean run
of the same seed and logging. Targets per cell: guarded >= 0.95x clean, no budget abort, no
crash of the fit (non-finite actions included); 0 rollbacks in the clean runs.

Runs go to 2 worker processes (one torch thread each). ``python bench_recovery.py sweep`` runs
part 2 only; ``quick`` part 1 only.
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass

UPDATES = 200
SAVE_EVERY = 10
POSITIONS = (60, 61, 62, 64, 65, 67, 68, 69)  # 60: on a save step; 69: just before the next
SEEDS = (0, 1, 2)
LOGGING = ("on_step", "on_epoch")
UPDATES_PER_EPOCH = 5
EVAL_BRIEFS = 300
EVAL_SEED = 424_242


@dataclass(frozen=True)
class Cell:
    logging: str
    seed: int
    fault_at: int | None  # None: the clean run
    guard: bool = True


@dataclass(frozen=True)
class Outcome:
    cell: Cell
    greedy: float
    logged: float
    rollbacks: tuple[tuple[int, int], ...]
    error: str = ""
    seconds: float = 0.0


def run_cell(cell: Cell) -> Outcome:
    """One training run in this (worker) process."""
    import torch
    from hydra import compose, initialize_config_dir

    from lightning_fragrance.cli.train import find_config_dir, run_training
    from lightning_fragrance.rl.evaluation import evaluate_policy

    torch.set_num_threads(1)
    started = time.perf_counter()
    overrides = [
        f"seed={cell.seed}",
        f"trainer.max_steps={UPDATES}",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "report.enabled=false",
    ]
    if cell.guard:
        overrides += [f"callbacks.rollback.save_every_n_steps={SAVE_EVERY}"]
    if cell.logging == "on_epoch":
        overrides += ["model.log_on_epoch=true", f"model.updates_per_epoch={UPDATES_PER_EPOCH}"]
    if cell.fault_at is not None:
        overrides += ["experiment=fault_lr_spike", f"callbacks.fault.at_step={cell.fault_at}"]
        overrides += [f"trainer.max_steps={UPDATES}"]
    if not cell.guard:  # the fault experiment still adds its callback (the original bench)
        overrides += ["callbacks=none", "trainer.enable_checkpointing=false"]
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            initialize_config_dir(config_dir=str(find_config_dir()), version_base="1.3"),
        ):
            cfg = compose("train", overrides=[f"paths.output_dir={tmp}", *overrides])
            result = run_training(cfg)
        module = result.module
        returns = evaluate_policy(
            module.policy_net,  # type: ignore[arg-type]
            module.config.env_id,  # type: ignore[union-attr]
            module.config.env_kwargs,  # type: ignore[union-attr]
            episodes=EVAL_BRIEFS,
            seed=EVAL_SEED,
        )
        moves = tuple((int(e["at_step"]), int(e["to_step"])) for e in result.rollback_events)
        return Outcome(
            cell,
            float(returns.mean()),
            result.final_reward(),
            moves,
            seconds=time.perf_counter() - started,
        )
    except Exception as err:  # a crash or a budget abort is a failed cell, not a dead benchmark
        return Outcome(cell, float("nan"), float("nan"), (), f"{type(err).__name__}: {err}"[:200])


def run_all(cells: list[Cell]) -> list[Outcome]:
    """Run the cells on 2 worker processes; print each outcome as it arrives (a long sweep
    shows its progress, and what finished is not lost if the run is stopped)."""
    context = multiprocessing.get_context("spawn")
    outcomes: list[Outcome] = []
    with context.Pool(processes=2, maxtasksperchild=1) as pool:
        for outcome in pool.imap_unordered(run_cell, cells, chunksize=1):
            cell = outcome.cell
            print(
                f"  [{len(outcomes) + 1}/{len(cells)}] {cell.logging} seed {cell.seed} "
                f"fault {cell.fault_at} guard {cell.guard}: greedy {outcome.greedy:.2f}, "
                f"rollbacks {list(outcome.rollbacks)}, {outcome.seconds:.0f} s {outcome.error}",
                flush=True,
            )
            outcomes.append(outcome)
    return outcomes


def quick() -> bool:
    """One seed, guarded vs unguarded vs clean (measured at 150 updates: 0.992x / 0.614x)."""
    clean, guarded, unguarded = run_all(
        [Cell("on_step", 0, None), Cell("on_step", 0, 75), Cell("on_step", 0, 75, guard=False)]
    )
    c, g, u = clean.greedy, guarded.greedy, unguarded.greedy
    print(f"fragrance PPO, {UPDATES} updates, lr x100 at update 75, seed 0 (greedy, 300 briefs)")
    print(f"  ours   : guarded {g:.2f} (rollbacks {list(guarded.rollbacks)}) {guarded.error}")
    print(f"  anchor : unguarded {u:.2f} {unguarded.error}; clean {c:.2f}")
    print(f"  ratio  : guarded / clean = {g / c:.3f}x; unguarded / clean = {u / c:.3f}x")
    print(f"  healthy run with the default guard: {len(clean.rollbacks)} false rollback(s)")
    print("  target : guarded >= 0.95x clean, unguarded lower, 0 false rollbacks")
    return g >= 0.95 * c and not (u >= g) and not clean.rollbacks


def sweep() -> bool:
    cells = [Cell(mode, seed, None) for mode in LOGGING for seed in SEEDS]
    cells += [Cell(m, s, f) for m in LOGGING for s in SEEDS for f in POSITIONS]
    started = time.perf_counter()
    outcomes = run_all(cells)
    clean = {(o.cell.logging, o.cell.seed): o for o in outcomes if o.cell.fault_at is None}
    print(
        f"\nsweep: lr x100 at each position of one save interval (every {SAVE_EVERY} updates), "
        f"{UPDATES} updates, per-update vs per-epoch ({UPDATES_PER_EPOCH} updates) logging, "
        f"seeds {list(SEEDS)}; greedy reward on {EVAL_BRIEFS} fresh briefs; "
        f"{time.perf_counter() - started:.0f} s"
    )
    header = "  logging   seed  clean  " + "  ".join(f"@{p:<5d}" for p in POSITIONS)
    print(header)
    failed: list[str] = []
    worst = float("inf")
    for mode in LOGGING:
        for seed in SEEDS:
            base = clean[(mode, seed)]
            if base.error or base.rollbacks:
                failed.append(f"clean {mode} seed {seed}: {base.error or base.rollbacks}")
            row = [f"  {mode:9s} {seed:4d}  {base.greedy:5.2f}"]
            for position in POSITIONS:
                [o] = [o for o in outcomes if o.cell == Cell(mode, seed, position)]
                ratio = o.greedy / base.greedy if not o.error else float("nan")
                worst = min(worst, ratio) if ratio == ratio else worst
                mark = "" if (not o.error and ratio >= 0.95) else "!"
                row.append(f"{ratio:5.3f}{mark}")
                if mark:
                    failed.append(f"{mode} seed {seed} fault@{position}: {o.error or ratio}")
            print("  ".join(row))
    rollbacks = [len(o.rollbacks) for o in outcomes if o.cell.fault_at is not None]
    print(
        f"  ours   : worst cell guarded/clean {worst:.3f}x; rollbacks per faulty run "
        f"{min(rollbacks)}-{max(rollbacks)}; {len(failed)} failed cell(s)"
    )
    print("  anchor : the clean run of the same seed and logging (column 'clean')")
    print("  target : every cell >= 0.95x, 0 budget aborts, 0 crashes, 0 clean rollbacks")
    for line in failed:
        print(f"  FAILED {line}")
    return not failed


def main(argv: list[str]) -> int:
    ok = True
    if not argv or "quick" in argv:
        ok = quick() and ok
    if not argv or "sweep" in argv:
        ok = sweep() and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
