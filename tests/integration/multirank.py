"""Start a two-rank script (DDP, FSDP2, Fabric) the way the multi-rank tests all do.

Lightning's and Fabric's launchers re-run the command that started rank 0 for the other ranks,
so a multi-rank test runs a plain script, never pytest itself. Rank 1 is rank 0's child, so the
script gets its own process group: a hang (ranks disagreeing on a collective wait forever) is
ended with every rank, and the test fails with the output instead of eating the suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

_LAUNCHER_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "PL_GLOBAL_SEED")


def free_port() -> int:
    """A free TCP port on the loopback interface (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(script: Path, *args: str, timeout_s: float, what: str) -> tuple[int, str]:
    """Run ``script args`` as rank 0 of a loopback process group; its exit status and output.

    Args:
        script: The standalone script (its launcher starts the other ranks).
        args: Its arguments.
        timeout_s: Past this the whole process group is killed and the test fails: the bound
            stops a hang, it is not a speed target.
        what: Names the run in the failure message.
    """
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    for name in _LAUNCHER_VARIABLES:  # a launcher's leftovers would make rank 0 think it is not
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(
            f"the {what} did not finish within {timeout_s:.0f} s (a hang: ranks disagreeing on "
            f"a collective?); its output:\n{stdout[-4000:]}"
        )
    return proc.returncode, stdout
