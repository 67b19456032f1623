"""The serving steps of ``make demo``: serve a checkpoint, then hot-reload a newer one.

1. export the older checkpoint and start ``lf-serve`` on loopback (a real uvicorn process);
2. ``POST /dna/create`` and print the answer with its ``X-Model-Version``;
3. export the newer checkpoint and ``POST /admin/model/reload``; wait for the reload record;
4. ``POST /dna/create`` again and print it; stop the server (SIGTERM, graceful).

    python -m lightning_fragrance.serving.demo_steps OLD.ckpt NEW.ckpt [WORKDIR]
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lightning_fragrance.serving.launcher import start_lf_serve
from lightning_fragrance.serving.loading import export

DEMO_TEXT = "a fresh citrus scent for summer, not too sweet"


@dataclass(frozen=True)
class DemoAnswer:
    """One ``/dna/create`` answer as the demo prints it."""

    version: str
    body: dict[str, Any]

    def summary(self) -> str:
        """Version, top ingredients, concentration and reward on a few lines."""
        dna = self.body["dna"]
        top = ", ".join(f"{line['name']} {line['percent']:.2f}%" for line in dna["ingredients"][:4])
        return (
            f"  X-Model-Version: {self.version}\n"
            f"  top ingredients: {top}\n"
            f"  concentration {dna['concentration_pct']:.1f}%, IFRA compliant "
            f"{dna['ifra_compliant']}, reward {dna['reward']['total']:.2f}"
        )


@dataclass(frozen=True)
class DemoResult:
    """Both answers and the reload record."""

    before: DemoAnswer
    after: DemoAnswer
    reload: dict[str, Any]


def _create(url: str) -> DemoAnswer:
    response = httpx.post(
        f"{url}/dna/create", json={"user_text": DEMO_TEXT, "mode": "balanced"}, timeout=30
    )
    response.raise_for_status()
    return DemoAnswer(version=response.headers["X-Model-Version"], body=response.json())


def run_serving_demo(
    old_checkpoint: str | Path,
    new_checkpoint: str | Path,
    workdir: str | Path | None = None,
    *,
    startup_timeout: float = 120.0,
) -> DemoResult:
    """Serve ``old_checkpoint``, hot-reload ``new_checkpoint``, print both answers.

    Args:
        old_checkpoint: the Lightning checkpoint served first.
        new_checkpoint: the newer checkpoint swapped in without a restart.
        workdir: where ``exports/`` and the server log go (default: a temporary directory).
        startup_timeout: seconds to wait for the server to be ready.
    """
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lf-serving-demo-"))
    exports = base / "exports"
    first = export(old_checkpoint, exports, make_current=True)
    token = secrets.token_urlsafe(16)
    log_path = base / "lf-serve.log"
    server = start_lf_serve(exports, token=token, log_path=log_path, drain_timeout_s=10)
    url = server.url
    print(f"[serving] exported {old_checkpoint} -> {first.name}; starting lf-serve on {url}")
    try:
        server.wait_ready(timeout=startup_timeout)
        before = _create(url)
        print(f"[serving] POST /dna/create {DEMO_TEXT!r}\n{before.summary()}")
        second = export(new_checkpoint, exports)
        print(f"[serving] exported {new_checkpoint} -> {second.name}; POST /admin/model/reload")
        auth = {"Authorization": f"Bearer {token}"}
        started = httpx.post(
            f"{url}/admin/model/reload", json={"version": second.name}, headers=auth, timeout=30
        )
        started.raise_for_status()
        status_url = url + started.json()["status_url"]
        record: dict[str, Any] = {}
        while not record.get("finished_at"):
            time.sleep(0.1)
            record = httpx.get(status_url, headers=auth, timeout=30).json()
        phases = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in record["phase_seconds"].items())
        print(f"[serving] reload {record['result']}: {phases}")
        after = _create(url)
        print(f"[serving] POST /dna/create again\n{after.summary()}")
    finally:
        server.stop()
    print(f"[serving] server stopped (log: {log_path})")
    return DemoResult(before=before, after=after, reload=record)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    run_serving_demo(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
