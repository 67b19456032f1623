"""The serving steps of ``make demo``: serve a checkpoint, then hot-reload a newer one.

1. export the older checkpoint and start ``lf-serve`` on loopback (a real uvicorn process);
   with the brief LLM line, a verified brief export (the model shipped in the package) is its
   first version and ``lf-serve`` runs with ``brief_backend=llm``;
2. ``POST /dna/create`` and print the answer with its ``X-Model-Version`` (and
   ``X-Brief-Model-Version``, ``X-Brief-Source``);
3. export the newer checkpoint and ``POST /admin/model/reload``; wait for the reload record;
4. ``POST /dna/create`` again and print it;
5. with the brief LLM line: produce a newer brief model (a short GRPO run under the guard),
   export its newest checkpoint with ``lf-export``'s code, ``POST /admin/model/reload
   {"model": "brief_llm"}``, wait for the record, ask again and print both brief versions;
6. stop the server (SIGTERM, graceful).

    python -m lightning_fragrance.serving.demo_steps OLD.ckpt NEW.ckpt [WORKDIR]
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lightning_fragrance.serving.launcher import start_lf_serve
from lightning_fragrance.serving.loading import export

DEMO_TEXT = "a fresh citrus scent for summer, not too sweet"
# Greedy decoding of the brief (the other modes sample): the same brief model writes the same
# brief, so a change between the answers is the model's.
DEMO_MODE = "fast"
# A second text for the brief LLM line, one this small model writes a valid brief for (on
# DEMO_TEXT it writes no usable JSON and the rules answer: `rules_fallback`); both are asked.
BRIEF_TEXT = "fresh citrus and a hint of green for summer"


@dataclass(frozen=True)
class DemoAnswer:
    """One ``/dna/create`` answer as the demo prints it.

    Attributes:
        version: ``X-Model-Version`` (the policy).
        body: The JSON answer.
        brief_version: ``X-Brief-Model-Version`` ("" without the brief LLM line).
        brief_source: ``X-Brief-Source`` (``llm``, ``llm_repaired``, ``rules_fallback``, ...).
    """

    version: str
    body: dict[str, Any]
    brief_version: str = ""
    brief_source: str = ""

    def brief_lines(self) -> list[str]:
        """The brief model's version and source (with the brief LLM line) and the brief."""
        lines = []
        if self.brief_version:
            lines.append(
                f"  X-Brief-Model-Version: {self.brief_version}, "
                f"X-Brief-Source: {self.brief_source}"
            )
        return [*lines, f"  brief: {brief_summary(self.body['brief'])}"]

    def summary(self) -> str:
        """Versions, the brief, top ingredients, concentration and reward on a few lines."""
        dna = self.body["dna"]
        top = ", ".join(f"{line['name']} {line['percent']:.2f}%" for line in dna["ingredients"][:4])
        lines = [f"  X-Model-Version: {self.version}", *self.brief_lines()]
        lines += [
            f"  top ingredients: {top}",
            f"  concentration {dna['concentration_pct']:.1f}%, IFRA compliant "
            f"{dna['ifra_compliant']}, reward {dna['reward']['total']:.2f}",
        ]
        return "\n".join(lines)


def brief_summary(brief: dict[str, Any]) -> str:
    """A brief on one line: the families it weights, what it avoids, mood, season, intensity."""
    families = sorted(
        ((f, w) for f, w in brief.get("profile", {}).items() if w > 0), key=lambda fw: -fw[1]
    )
    parts = [", ".join(f"{f} {w:.1f}" for f, w in families) or "no family"]
    for key in ("include_notes", "avoid_notes", "avoid_families"):
        if brief.get(key):
            parts.append(f"{key.replace('_', ' ')}: {', '.join(brief[key])}")
    parts += [f"{k} {brief[k]}" for k in ("mood", "season", "intensity") if brief.get(k)]
    return "; ".join(parts)


@dataclass(frozen=True)
class BriefLineDemo:
    """The brief LLM part of the serving demo.

    Attributes:
        first_export: A verified brief export served as the line's first version (the model
            shipped in the package).
        fine_tune: Returns the newest guard checkpoint of a newer brief model, training it or
            waiting for its training (the demo: a short GRPO run under `RollbackCheckpoint`,
            started in the background).
    """

    first_export: Path
    fine_tune: Callable[[], Path]


@dataclass(frozen=True)
class BriefAnswers:
    """The brief LLM line's answers: ``DEMO_TEXT`` after the brief reload, ``BRIEF_TEXT``
    before and after it, and the reload record."""

    after: DemoAnswer
    second_before: DemoAnswer
    second_after: DemoAnswer
    reload: dict[str, Any]


@dataclass(frozen=True)
class DemoResult:
    """The answers and the reload records (``brief`` without the brief LLM line: None)."""

    before: DemoAnswer
    after: DemoAnswer
    reload: dict[str, Any]
    brief: BriefAnswers | None = None


def _create(url: str, text: str = DEMO_TEXT) -> DemoAnswer:
    response = httpx.post(
        f"{url}/dna/create", json={"user_text": text, "mode": DEMO_MODE}, timeout=60
    )
    response.raise_for_status()
    return DemoAnswer(
        version=response.headers["X-Model-Version"],
        body=response.json(),
        brief_version=response.headers.get("X-Brief-Model-Version", ""),
        brief_source=response.headers.get("X-Brief-Source", ""),
    )


def _reload(url: str, token: str, body: dict[str, str]) -> dict[str, Any]:
    """``POST /admin/model/reload`` and poll its record until it has finished."""
    auth = {"Authorization": f"Bearer {token}"}
    started = httpx.post(f"{url}/admin/model/reload", json=body, headers=auth, timeout=30)
    started.raise_for_status()
    status_url = url + started.json()["status_url"]
    record: dict[str, Any] = {}
    while not record.get("finished_at"):
        time.sleep(0.1)
        record = httpx.get(status_url, headers=auth, timeout=30).json()
    phases = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in record["phase_seconds"].items())
    switch = record.get("switch_seconds")
    switched = "" if switch is None else f"; switch {switch * 1e3:.1f} ms"
    print(f"[serving] reload {record['result']}: {phases}{switched}")
    return record


def _install_first_brief_model(brief: BriefLineDemo, exports: Path) -> str:
    """The brief line's first version and CURRENT: a verified copy of ``brief.first_export``."""
    from lightning_fragrance.llm.export import copy_brief_export

    first = copy_brief_export(brief.first_export, exports, make_current=True)
    print(f"[serving] brief LLM: verified {brief.first_export} -> brief_llm/{first.name} (CURRENT)")
    return first.name


def _ask_brief_text(url: str) -> DemoAnswer:
    answer = _create(url, BRIEF_TEXT)
    print(f"[serving] POST /dna/create {BRIEF_TEXT!r}\n" + "\n".join(answer.brief_lines()))
    return answer


def _reload_newer_brief_model(
    brief: BriefLineDemo, url: str, token: str, base: Path, first: DemoAnswer
) -> BriefAnswers:
    """Fine-tune, export with lf-export's code, hot-reload the brief line, ask again."""
    from lightning_fragrance.cli.export import export_checkpoint

    second_before = _ask_brief_text(url)
    checkpoint = brief.fine_tune()
    exports = base / "exports"
    version = Path(export_checkpoint(checkpoint, exports)).name
    print(
        f"[serving] lf-export ckpt_path={checkpoint} export_dir={exports} -> "
        f'brief_llm/{version}; POST /admin/model/reload {{"model": "brief_llm"}}'
    )
    record = _reload(url, token, {"model": "brief_llm", "version": version})
    after = _create(url)
    print(f"[serving] POST /dna/create again\n{after.summary()}")
    second_after = _ask_brief_text(url)
    print(
        f"[serving] X-Brief-Model-Version: {first.brief_version} -> {after.brief_version} "
        "(hot-reloaded, no restart)"
    )
    return BriefAnswers(after, second_before, second_after, record)


def run_serving_demo(
    old_checkpoint: str | Path,
    new_checkpoint: str | Path,
    workdir: str | Path | None = None,
    *,
    brief_llm: BriefLineDemo | None = None,
    startup_timeout: float = 120.0,
) -> DemoResult:
    """Serve ``old_checkpoint``, hot-reload ``new_checkpoint``, print both answers; with
    ``brief_llm``, serve the brief LLM line too and hot-reload a newer brief model.

    Args:
        old_checkpoint: the Lightning checkpoint served first.
        new_checkpoint: the newer checkpoint swapped in without a restart.
        workdir: where ``exports/`` and the server log go (default: a temporary directory).
        brief_llm: the brief LLM line's models (None: the rule parser writes the briefs).
        startup_timeout: seconds to wait for the server to be ready.
    """
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lf-serving-demo-"))
    exports = base / "exports"
    first = export(old_checkpoint, exports, make_current=True)
    if brief_llm is not None:
        _install_first_brief_model(brief_llm, exports)
    token = secrets.token_urlsafe(16)
    log_path = base / "lf-serve.log"
    server = start_lf_serve(
        exports,
        token=token,
        log_path=log_path,
        drain_timeout_s=10,
        brief_backend="rules" if brief_llm is None else "llm",
    )
    url = server.url
    print(f"[serving] exported {old_checkpoint} -> {first.name}; starting lf-serve on {url}")
    brief = None
    try:
        server.wait_ready(timeout=startup_timeout)
        before = _create(url)
        print(f"[serving] POST /dna/create {DEMO_TEXT!r}\n{before.summary()}")
        second = export(new_checkpoint, exports)
        print(f"[serving] exported {new_checkpoint} -> {second.name}; POST /admin/model/reload")
        record = _reload(url, token, {"version": second.name})
        after = _create(url)
        print(f"[serving] POST /dna/create again\n{after.summary()}")
        if brief_llm is not None:
            brief = _reload_newer_brief_model(brief_llm, url, token, base, after)
    finally:
        server.stop()
    print(f"[serving] server stopped (log: {log_path})")
    return DemoResult(before=before, after=after, reload=record, brief=brief)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    run_serving_demo(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
