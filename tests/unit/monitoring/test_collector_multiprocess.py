"""Multiprocess mode: several processes write, one exposition merges them (real processes).

prometheus_client picks its mmap-backed values when it is imported with
``PROMETHEUS_MULTIPROC_DIR`` set, so each scenario runs in fresh Python subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

WRITER = textwrap.dedent(
    """
    import os, sys
    from prometheus_client import CollectorRegistry
    from lightning_fragrance.monitoring import OperationsMetricsCollector
    collector = OperationsMetricsCollector(CollectorRegistry())
    for _ in range(int(sys.argv[1])):
        collector.record_api_request("/dna/create", "POST", 200, 0.01)
        collector.record_llm_brief("creative", True, 4.0)
    for step in sys.argv[2:]:
        action, version, *role = step.split(":")
        if action == "set":
            collector.set_model_version(version, role[0])
        else:
            collector.retire_model_version(version)
    print(os.getpid())
    """
)
READER = textwrap.dedent(
    """
    import sys
    from prometheus_client import CollectorRegistry, multiprocess
    from lightning_fragrance.monitoring import OperationsMetricsCollector
    for pid in sys.argv[1:]:
        multiprocess.mark_process_dead(int(pid))
    sys.stdout.write(OperationsMetricsCollector(CollectorRegistry()).exposition().decode())
    """
)


def _python(code: str, directory: Path, *args: str) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counts_of_all_processes_are_merged_in_one_exposition(tmp_path: Path) -> None:
    _python(WRITER, tmp_path, "3")
    _python(WRITER, tmp_path, "4")
    samples = _samples(_python(READER, tmp_path))

    key = (
        "api_request_total",
        (("endpoint", "/dna/create"), ("method", "POST"), ("status", "200")),
    )
    assert samples[key] == 7
    assert samples[("llm_brief_latency_seconds_count", (("mode", "creative"),))] == 7


def test_model_info_is_one_while_any_live_worker_serves_the_version(tmp_path: Path) -> None:
    # Worker A switched to v2 and retired v1; worker B still serves v1.
    _python(
        WRITER, tmp_path, "0", "set:v1:current", "set:v1:draining", "set:v2:current", "retire:v1"
    )
    pid_b = _python(WRITER, tmp_path, "0", "set:v1:current").strip()

    merged = _samples(_python(READER, tmp_path))
    assert merged[("model_info", (("role", "current"), ("version", "v1")))] == 1
    assert merged[("model_info", (("role", "current"), ("version", "v2")))] == 1
    assert merged[("model_info", (("role", "draining"), ("version", "v1")))] == 0

    # Once B is gone (its files marked dead), v1 is no longer current anywhere: 0, not removed.
    after = _samples(_python(READER, tmp_path, pid_b))
    assert after[("model_info", (("role", "current"), ("version", "v1")))] == 0
    assert after[("model_info", (("role", "current"), ("version", "v2")))] == 1
