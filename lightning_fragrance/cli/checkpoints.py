"""``lf-checkpoints``: inspect and manage a checkpoint directory written by the engine.

    lf-checkpoints list DIR          # the history as a table, then the rollback events
    lf-checkpoints verify DIR        # re-hash every checkpoint; exit status 1 if one is bad
    lf-checkpoints pin DIR STEP      # keep a checkpoint forever (outside retention)
    lf-checkpoints unpin DIR STEP

DIR is a local path or an fsspec URL.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence

import fsspec

from lightning_fragrance.checkpointing import HISTORY_FILE, CheckpointError, CheckpointStore

METRIC_COLUMNS = ("loss", "reward", "kl_divergence")


def _open(directory: str, read_only: bool) -> CheckpointStore:
    fs, path = fsspec.core.url_to_fs(directory)
    if not fs.exists(f"{path.rstrip('/')}/{HISTORY_FILE}"):
        raise CheckpointError(
            f"{directory} holds no {HISTORY_FILE}: not a checkpoint directory written by "
            "lightning_fragrance (or no checkpoint was committed yet)"
        )
    return CheckpointStore(directory, read_only=read_only)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def cmd_list(directory: str) -> int:
    store = _open(directory, read_only=True)
    rows = [["step", "status", "pinned", "size", "created (UTC)", *METRIC_COLUMNS, "file", "why"]]
    for record in store.records():
        created = dt.datetime.fromtimestamp(record.created_at, dt.timezone.utc)
        rows.append(
            [
                str(record.step),
                record.status,
                "yes" if record.pinned else "",
                f"{record.bytes / 1e6:.1f} MB",
                created.strftime("%Y-%m-%d %H:%M:%S"),
                *(_number(record.metrics.get(name)) for name in METRIC_COLUMNS),
                record.file,
                record.note if not record.is_rollback_target else "",
            ]
        )
    run = store.run_id or "(none: written before run ids)"
    print(f"{store.history_path}: {len(rows) - 1} checkpoint(s) of run {run}")
    if len(rows) > 1:
        print(_table(rows))
    events = store.events()
    if events:
        print(f"\n{len(events)} event(s):")
        event_rows = [["type", "at_step", "to_step", "reason", "message"]]
        for event in events:
            event_rows.append(
                [
                    str(event.get("type", "")),
                    str(event.get("at_step", "")),
                    str(event.get("to_step", "")),
                    str(event.get("reason", "")),
                    str(event.get("message", "")),
                ]
            )
        print(_table(event_rows))
    return 0


def cmd_verify(directory: str) -> int:
    store = _open(directory, read_only=True)
    bad = 0
    for record in store.records():
        problem = store.check(record)
        bad += problem is not None
        if problem is None:
            print(f"OK      step={record.step} {record.file}")
        else:
            print(f"CORRUPT step={record.step} {record.file}: {problem}")
    total = len(store.records())
    print(
        f"{total - bad} of {total} checkpoint(s) match their sha256 and load safely "
        "(torch.load weights_only=True, as the rollback loader does)"
    )
    return 1 if bad else 0


def cmd_pin(directory: str, step: int, pinned: bool) -> int:
    store = _open(directory, read_only=False)
    record = store.pin(step) if pinned else store.unpin(step)
    action = "pinned (kept outside retention)" if pinned else "unpinned (subject to retention)"
    print(f"step={record.step} {record.file} {action}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lf-checkpoints", description="Inspect and manage a lightning_fragrance checkpoint dir"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("list", "print the history"), ("verify", "re-hash every checkpoint")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("directory", help="checkpoint directory or fsspec URL")
    for name, text in (("pin", "keep a checkpoint forever"), ("unpin", "undo pin")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("directory", help="checkpoint directory or fsspec URL")
        sub.add_argument("step", type=int, help="step of the checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lf-checkpoints`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return cmd_list(args.directory)
        if args.command == "verify":
            return cmd_verify(args.directory)
        return cmd_pin(args.directory, args.step, pinned=args.command == "pin")
    except CheckpointError as err:
        print(f"lf-checkpoints: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. EROFS: pin/unpin on a read-only filesystem
        print(
            f"lf-checkpoints: error: cannot write to {args.directory} ({type(err).__name__}: "
            f"{err}); list and verify only read and work on a read-only filesystem.",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
