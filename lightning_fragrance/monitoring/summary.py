"""Find a local Pushgateway and print a short metrics summary (used by ``make demo``).

``make monitoring`` writes where its servers listen to ``outputs/monitoring/stack.json``; the
demo pushes there when the stack runs and prints the same summary either way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from prometheus_client import CollectorRegistry

from lightning_fragrance.monitoring.servers import is_ready

STACK_FILE = Path("outputs") / "monitoring" / "stack.json"
PUSHGATEWAY_ENV = "PUSHGATEWAY_URL"
DEFAULT_PUSHGATEWAY = "127.0.0.1:9091"


def local_pushgateway(stack_file: Path = STACK_FILE) -> str | None:
    """Address of a running Pushgateway, or None.

    Looks at ``$PUSHGATEWAY_URL``, then the stack file of ``make monitoring``, then the default
    127.0.0.1:9091, and returns the first that answers ``/-/ready``.
    """
    candidates = [os.environ.get(PUSHGATEWAY_ENV, "")]
    with contextlib.suppress(OSError, ValueError, KeyError):  # no stack running: fine
        candidates.append(json.loads(stack_file.read_text())["pushgateway"])
    candidates.append(DEFAULT_PUSHGATEWAY)
    for candidate in filter(None, candidates):
        url = candidate if "://" in candidate else f"http://{candidate}"
        if is_ready(url.rstrip("/")):
            return candidate
    return None


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, spec)


def format_summary(registry: CollectorRegistry) -> str:
    """A few lines an operator reads first: updates, losses, reward, KL, checkpoints, pushes."""

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    def total(name: str) -> float:
        return sum(
            sample.value
            for metric in registry.collect()
            for sample in metric.samples
            if sample.name == name
        )

    rollbacks = {
        sample.labels["reason"]: sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "checkpoint_rollbacks_total" and sample.value > 0
    }
    by_reason = ", ".join(f"{k}={v:.0f}" for k, v in sorted(rollbacks.items()))
    saves = _fmt(get("checkpoint_saves_total", result="success"), ".0f")
    save_errors = _fmt(get("checkpoint_saves_total", result="error"), ".0f")
    losses = " / ".join(_fmt(get("rl_loss", type=t)) for t in ("policy", "value", "total"))
    lines = [
        "metrics summary",
        f"  rl_update_total             {_fmt(total('rl_update_total'), '.0f')}",
        f"  rl_loss policy/value/total  {losses}",
        f"  rl_reward                   {_fmt(get('rl_reward'))}",
        f"  rl_kl_divergence            {_fmt(get('rl_kl_divergence'))}",
        f"  checkpoint_saves_total      {saves} (errors {save_errors})",
        f"  checkpoint_rollbacks_total  {sum(rollbacks.values()):.0f}"
        + (f" ({by_reason})" if by_reason else ""),
        f"  push errors                 {_fmt(get('rl_logger_push_errors_total'), '.0f')}",
    ]
    return "\n".join(lines)
