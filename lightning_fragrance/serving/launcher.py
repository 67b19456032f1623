"""Start ``lf-serve`` as a real subprocess on loopback and wait until ``/ready`` answers 200.

The one way the demo (``make demo``), the integration tests and the serving benchmarks start a
server: a free port on 127.0.0.1, the admin token in the environment, the output in a log file,
``/ready`` polled until the model serves, and a stop by the process's own PID (SIGTERM, then
SIGKILL) so that nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from lightning_fragrance.serving.settings import ADMIN_TOKEN_ENV

LOOPBACK = "127.0.0.1"
# A parent's prometheus multiprocess directory would make the child merge stale files into its
# /metrics; lf-serve creates its own when it runs several workers.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ServeProcessError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log's tail."""


def free_port() -> int:
    """A TCP port free on loopback right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServeProcess:
    """A server subprocess on loopback.

    Attributes:
        process: the subprocess.
        url: its base URL (``http://127.0.0.1:<port>``).
        log_path: the file holding its stdout and stderr.
        own_group: it runs in a session of its own, so ``stop`` signals its whole process
            group (servers that spawn worker processes, like LitServe's).
    """

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    own_group: bool = False

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, path: str = "/ready", timeout: float = 120.0) -> None:
        """Poll ``path`` until it answers 200.

        Raises:
            ServeProcessError: the process exited first, or ``timeout`` seconds passed.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeProcessError(
                    f"server exited with {self.process.returncode} before {path} answered 200:"
                    f"\n{self.log()[-3000:]}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise ServeProcessError(
            f"{self.url}{path} did not answer 200 within {timeout:.0f} s:\n{self.log()[-3000:]}"
        )

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: ``/ready`` 503, drain, exit), SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(5)
        if self.own_group:
            # Workers that outlived their parent share its group (and nothing else does).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        return int(self.process.returncode)

    def _signal(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.own_group:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)


def start_lf_serve(
    export_dir: str | Path,
    *,
    token: str | None = None,
    log_path: str | Path | None = None,
    cwd: str | Path | None = None,
    own_group: bool = False,
    env: Mapping[str, str] | None = None,
    **settings: object,
) -> ServeProcess:
    """Start ``lf-serve`` on a free loopback port and return at once (then ``wait_ready``).

    Args:
        export_dir: the export store to serve: a directory, or a URL (``s3://bucket/exports``;
            the endpoint and credentials then come from ``env``'s ``AWS_*`` variables).
        token: the admin token (``LF_ADMIN_TOKEN``); ``None`` leaves the admin routes off.
        log_path: where its output goes (default: a new temporary file).
        cwd: its working directory (default: this process's).
        own_group: start it in a session of its own (see ``ServeProcess.own_group``).
        env: the environment (default: this process's, without a prometheus multiprocess dir).
        **settings: more ``lf-serve`` keys (``warmup_steps=2``, ``workers=2``...).
    """
    port = free_port()
    child_env = dict(os.environ if env is None else env)
    child_env.pop(_MULTIPROC_ENV, None)
    if token is not None:
        child_env[ADMIN_TOKEN_ENV] = token
    keys = {"export_dir": str(export_dir), "host": LOOPBACK, "port": port, **settings}
    path = Path(log_path or tempfile.mkstemp(prefix="lf-serve-", suffix=".log")[1])
    with path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "lightning_fragrance.cli.serve"]
            + [f"{key}={value}" for key, value in keys.items()],
            cwd=cwd,
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,
        )
    return ServeProcess(process, f"http://{LOOPBACK}:{port}", path, own_group=own_group)
