"""Helpers to run `lf-serve` as a real uvicorn subprocess on loopback (stopped by PID).

The start-and-wait logic is the package's own (`lightning_fragrance.serving.launcher`), shared
with the demo and the benchmarks; this module only fixes the tests' token and defaults.
"""

from __future__ import annotations

from pathlib import Path

from lightning_fragrance.serving.launcher import ServeProcess, free_port, start_lf_serve

TOKEN = "integration-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[3]

# The tests' name for the launcher's process handle.
ServerProcess = ServeProcess

__all__ = ["AUTH", "REPO", "TOKEN", "ServerProcess", "free_port", "start_server"]


def start_server(export_dir: Path, log_dir: Path, **overrides: object) -> ServerProcess:
    """Start `lf-serve` on `export_dir` (not waiting for it); its log goes to `log_dir`."""
    settings: dict[str, object] = {
        "warmup_steps": 2,
        "reconcile_interval_s": 0.5,
        "log_level": "INFO",
        **overrides,
    }
    log_path = log_dir / f"server-{free_port()}.log"
    return start_lf_serve(export_dir, token=TOKEN, log_path=log_path, cwd=REPO, **settings)
