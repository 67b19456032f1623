"""Run every benchmark in this folder (`make bench`), one subprocess each, in name order.

Each benchmark prints our figure, the anchor's figure measured in the same run, and the ratio.
Pass names to run a subset: `python benchmarks/run_all.py guard_overhead recovery`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    scripts = sorted(p for p in here.glob("bench_*.py"))
    if argv:
        scripts = [p for p in scripts if any(name in p.stem for name in argv)]
    failed = []
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        result = subprocess.run([sys.executable, str(script)], check=False)
        if result.returncode != 0:
            failed.append(script.stem)
    if failed:
        print(f"\nbenchmarks that failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
