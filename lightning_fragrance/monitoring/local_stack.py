"""``make monitoring``: a local Prometheus + Pushgateway on 127.0.0.1 for a user.

Starts both with the repository's ``monitoring/prometheus.yml`` (app target and Pushgateway
filled in, the recording and alert rules loaded), records where they listen in
``outputs/monitoring/stack.json`` (``make demo`` pushes there), prints how to train against it and
how to import the Grafana dashboard, and stops both by PID on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from lightning_fragrance.monitoring.dashboard import DASHBOARD_PATH
from lightning_fragrance.monitoring.servers import (
    MissingBinaryError,
    MonitoringStack,
    ServerStartError,
    is_ready,
    start_stack,
)
from lightning_fragrance.monitoring.summary import STACK_FILE


def import_command(grafana_url: str = "http://127.0.0.1:3000") -> str:
    """Shell command that imports the dashboard through Grafana's HTTP API."""
    body = f"{sys.executable} -m lightning_fragrance.monitoring.dashboard --import-body"
    return (
        'curl -sf -X POST -H "Authorization: Bearer $GRAFANA_TOKEN" '
        "-H 'Content-Type: application/json' "
        f"--data @<({body}) {shlex.quote(grafana_url)}/api/dashboards/db"
    )


def describe(stack: MonitoringStack, app_targets: Sequence[str]) -> str:
    """What the user reads once the stack is up."""
    gateway = stack.pushgateway.address
    return "\n".join(
        [
            f"Prometheus   {stack.prometheus.url}  (pid {stack.prometheus.pid})",
            f"Pushgateway  {stack.pushgateway.url}  (pid {stack.pushgateway.pid})",
            f"Scraping     {', '.join(app_targets) or '(no app target)'} and the Pushgateway",
            "",
            "Train against it:",
            f"  lf-train logger=prometheus logger.pushgateway_url={gateway}",
            f"  (or export PUSHGATEWAY_URL={gateway}; make demo finds it by itself)",
            "",
            f"Grafana: add a Prometheus data source at {stack.prometheus.url}, then import",
            f"{DASHBOARD_PATH.name}:",
            f"  {import_command()}",
            "",
            "Ctrl-C stops both servers.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stack in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description="Local Prometheus + Pushgateway on 127.0.0.1")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--pushgateway-port", type=int, default=9091)
    parser.add_argument(
        "--app-target",
        action="append",
        default=None,
        help="host:port of a /metrics endpoint to scrape (default 127.0.0.1:8000, lf-serve)",
    )
    parser.add_argument("--scrape-interval", default="5s")
    parser.add_argument("--workdir", type=Path, default=STACK_FILE.parent)
    args = parser.parse_args(argv)
    app_targets = args.app_target or ["127.0.0.1:8000"]

    for port in (args.prometheus_port, args.pushgateway_port):
        if is_ready(f"http://127.0.0.1:{port}"):
            print(f"something already serves 127.0.0.1:{port} (a running stack?); stop it first")
            return 1
    try:
        stack = start_stack(
            args.workdir,
            app_targets=app_targets,
            prometheus_port=args.prometheus_port,
            pushgateway_port=args.pushgateway_port,
            scrape_interval=args.scrape_interval,
            evaluation_interval=args.scrape_interval,
        )
    except (MissingBinaryError, ServerStartError) as exc:
        print(f"cannot start the monitoring stack: {exc}", file=sys.stderr)
        return 1

    stack_file = args.workdir / STACK_FILE.name
    stack_file.write_text(
        json.dumps(
            {
                "prometheus": stack.prometheus.address,
                "pushgateway": stack.pushgateway.address,
                "pids": {"prometheus": stack.prometheus.pid, "pushgateway": stack.pushgateway.pid},
            }
        )
    )
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(describe(stack, app_targets), flush=True)
    try:
        while not stopping.wait(1.0):
            for server in (stack.prometheus, stack.pushgateway):
                if server.process.poll() is not None:
                    print(f"{server.name} exited:\n{server.log_tail()}", file=sys.stderr)
                    stopping.set()
    finally:
        stack.stop()
        stack_file.unlink(missing_ok=True)
        print("stopped Prometheus and Pushgateway")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
