"""Start and stop real Prometheus and Pushgateway processes on 127.0.0.1 (tests, demo, users).

The Debian packages' defaults do not fit here (config in /etc, TSDB in /var/lib, listening on
0.0.0.0): every flag is explicit. Both servers are ready in about 0.1 s (research note §0), are
stopped by PID, and their logs go to files in the working directory for post-mortems.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_fragrance.monitoring.dashboard import MONITORING_DIR

PROMETHEUS_BINARY = "prometheus"
PUSHGATEWAY_BINARY = "prometheus-pushgateway"
INSTALL_HINT = (
    "sudo apt-get install -y prometheus prometheus-pushgateway (or ./scripts/install_prometheus.sh)"
)


class MissingBinaryError(RuntimeError):
    """A Prometheus binary is not installed."""


class ServerStartError(RuntimeError):
    """A server exited or did not become ready in time."""


def require_binary(name: str) -> str:
    """Path of an installed binary.

    Raises:
        MissingBinaryError: With the install command.
    """
    path = shutil.which(name)
    if path is None:
        raise MissingBinaryError(f"{name!r} is not on PATH; install it: {INSTALL_HINT}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller retries if it is taken by then)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_ready(url: str, timeout: float = 0.5) -> bool:
    """Whether ``url``/-/ready answers 200."""
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class ManagedServer:
    """A server process this module started."""

    name: str
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        """Process id (what ``stop`` signals)."""
        return self.process.pid

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9091``."""
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port``, the form scrape targets and ``push_to_gateway`` take."""
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM by PID, then SIGKILL after ``timeout`` (Prometheus exits in ~1.3 s)."""
        if self.process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the server's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _start(
    name: str, argv: Sequence[str], host: str, port: int, workdir: Path, timeout: float
) -> ManagedServer:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = ManagedServer(name, process, host, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(
                f"{name} exited with code {process.returncode}:\n{server.log_tail()}"
            )
        if is_ready(server.url):
            return server
        time.sleep(0.05)
    server.stop()
    raise ServerStartError(f"{name} not ready within {timeout}s:\n{server.log_tail()}")


def start_pushgateway(
    workdir: Path, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 15.0
) -> ManagedServer:
    """Start ``prometheus-pushgateway`` without persistence (port 0: a free one)."""
    binary = require_binary(PUSHGATEWAY_BINARY)
    chosen = port or free_port(host)
    argv = [
        binary,
        f"--web.listen-address={host}:{chosen}",
        "--persistence.file=",
        "--log.level=warn",
    ]
    return _start("pushgateway", argv, host, chosen, workdir, timeout)


def start_prometheus(
    config_path: Path,
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 15.0,
) -> ManagedServer:
    """Start ``prometheus`` with a TSDB under ``workdir`` and the lifecycle API (reload)."""
    binary = require_binary(PROMETHEUS_BINARY)
    chosen = port or free_port(host)
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address={host}:{chosen}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]
    return _start("prometheus", argv, host, chosen, workdir, timeout)


def render_prometheus_config(
    destination: Path,
    *,
    app_targets: Sequence[str],
    pushgateway_target: str | None,
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
    template: Path = MONITORING_DIR / "prometheus.yml",
) -> Path:
    """Write a copy of the repo's ``prometheus.yml`` pointing at the given targets.

    Keeps the repo file's jobs, ``honor_labels`` and rule files (made absolute, and copied next
    to the config so promtool-style relative paths still work), replaces only targets and
    intervals: tests exercise the same configuration users run.
    """
    config: dict[str, Any] = yaml.safe_load(template.read_text())
    if scrape_interval:
        config["global"]["scrape_interval"] = scrape_interval
    if evaluation_interval:
        config["global"]["evaluation_interval"] = evaluation_interval
    config["rule_files"] = [str((template.parent / f).resolve()) for f in config["rule_files"]]
    jobs = []
    for job in config["scrape_configs"]:
        if job.get("honor_labels"):
            if pushgateway_target is None:
                continue
            job["static_configs"] = [{"targets": [pushgateway_target]}]
        else:
            if not app_targets:
                continue
            job["static_configs"] = [{"targets": list(app_targets)}]
        jobs.append(job)
    config["scrape_configs"] = jobs
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(yaml.safe_dump(config, sort_keys=False))
    return destination


@dataclass
class MonitoringStack:
    """A Pushgateway and a Prometheus that scrapes it (and the app targets)."""

    prometheus: ManagedServer
    pushgateway: ManagedServer
    config_path: Path

    def stop(self) -> None:
        """Stop both servers by PID."""
        self.prometheus.stop()
        self.pushgateway.stop()


def start_stack(
    workdir: Path,
    *,
    app_targets: Sequence[str] = (),
    host: str = "127.0.0.1",
    prometheus_port: int = 0,
    pushgateway_port: int = 0,
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
) -> MonitoringStack:
    """Start Pushgateway then Prometheus (configured from the repo's file) on ``host``."""
    pushgateway = start_pushgateway(workdir / "pushgateway", host=host, port=pushgateway_port)
    try:
        config = render_prometheus_config(
            workdir / "prometheus.yml",
            app_targets=app_targets,
            pushgateway_target=pushgateway.address,
            scrape_interval=scrape_interval,
            evaluation_interval=evaluation_interval,
        )
        prometheus = start_prometheus(
            config, workdir / "prometheus", host=host, port=prometheus_port
        )
    except BaseException:
        pushgateway.stop()
        raise
    return MonitoringStack(prometheus, pushgateway, config)


class PrometheusAPI:
    """Minimal client of Prometheus's HTTP query API (instant queries)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def query(self, expr: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Run an instant query and return its result vector.

        Raises:
            ValueError: Prometheus rejected the query (the message carries its error).
        """
        params = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(
                f"{self.url}/api/v1/query?{params}", timeout=timeout
            ) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 carries the PromQL error in the body
            body = json.load(exc)
        if body.get("status") != "success":
            raise ValueError(f"query {expr!r} failed: {body.get('error', body)}")
        return list(body["data"]["result"])

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns data or ``timeout`` passes (returns the last result)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.25)
