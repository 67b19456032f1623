"""Normal clients of ``/dna/create`` while two connections send worst-case brief texts.

Claim (issue 10, item 5): worst-case texts cost a bounded, linear amount in the rule parser, so
they cannot starve the other clients: 8 connections, 2 of them sending worst-case texts,
against the same 6 normal connections with the attackers idle, the normal clients keep
>= 0.8x their requests/s and at most 2x their p99. Before the linear parser, 4 such clients cut
4 normal ones from 715 to 39 req/s and raised their p99 from 12 to 254 ms.

Method: a short real ``Trainer.fit`` of PPO on the fragrance task, exported; one ``lf-serve``
process on 127.0.0.1 (the defaults of ``configs/serve.yaml``). The load is ``wrk`` (C, cheap
for the shared cores): one wrk with the 6 normal connections (``wrk_dna.lua``: the four texts of
the serving benchmark in turn) and, in the attacked rounds, a second wrk with 2 connections
posting the worst case the server accepts: ``max_user_text_chars`` (2,000) characters of
"꽃 안 꽃 안 ...", a keyword and a negation cue over and over (the most parser work a text of
that length causes among the shapes ``bench_brief_parse.py`` tried). Each connection sends its
next request when the last answer arrives. Rounds alternate idle, attacked and calibration twice
(2 s warm-up, 6 s measured); the best round of each kind counts, so a neighbour's CPU burst hurts
neither kind alone. The anchor is the same 6 normal connections with the attackers idle, in the
same run. The calibration rounds have the 2 extra connections send a typical brief instead: what
2 more connections cost a saturated server whatever their text, the best any parser could reach.

Run: ``python benchmarks/bench_attack_mix.py`` (about 80 seconds, at most 90: rounds that would
not fit are skipped; needs ``wrk``:
``make bench`` installs it with apt when it runs as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench_brief_parse import TYPICAL, hangul_with_cues
from serving_harness import start_ours, train_checkpoints

from lightning_fragrance.serving.loading import export
from lightning_fragrance.serving.settings import ServeSettings

NORMAL_CONNECTIONS = 6
ATTACK_CONNECTIONS = 2
WARMUP_S = 2
SECONDS = 6
ROUNDS = 2
BUDGET_S = 90.0  # the whole run, imports and training included
STOP_S = 5.0  # stopping the server and printing
NORMAL_SCRIPT = Path(__file__).with_name("wrk_dna.lua")
TARGET_RPS_RATIO = 0.8  # attacked / idle, at least
TARGET_P99_RATIO = 2.0  # attacked / idle, at most

# The attackers' wrk script: one fixed body, and the same JSON summary line as wrk_dna.lua.
ATTACK_SCRIPT = """
local body = [==[{body}]==]
local headers = {{ ["Content-Type"] = "application/json" }}
request = function() return wrk.format("POST", nil, headers, body) end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"socket_errors": %d, "non_2xx": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run's figures."""

    rps: float
    p99: float
    failures: int


def wrk_command(url: str, connections: int, seconds: int, script: Path) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]


def parse(stdout: str) -> WrkResult:
    figures = json.loads(stdout.strip().splitlines()[-1])
    return WrkResult(
        rps=figures["requests"] / (figures["duration_us"] / 1e6),
        p99=figures["p99_us"] / 1e6,
        failures=figures["socket_errors"] + figures["non_2xx"],
    )


def run_round(url: str, attack_script: Path | None) -> tuple[WrkResult, WrkResult | None]:
    """The 6 normal connections for ``SECONDS`` (after a warm-up), with or without attackers.

    The attackers start first and run a little longer, so they load the whole measured window.
    """
    attackers = None
    if attack_script is not None:
        attackers = subprocess.Popen(
            wrk_command(url, ATTACK_CONNECTIONS, WARMUP_S + SECONDS + 1, attack_script),
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        for duration in (WARMUP_S, SECONDS):
            done = subprocess.run(
                wrk_command(url, NORMAL_CONNECTIONS, duration, NORMAL_SCRIPT),
                capture_output=True,
                text=True,
                check=True,
            )
        normal = parse(done.stdout)
        attacked = None
        if attackers is not None:
            out, _ = attackers.communicate(timeout=30)
            attacked = parse(out)
    finally:
        if attackers is not None and attackers.poll() is None:
            attackers.kill()  # our own child, by its handle
            attackers.wait()
    return normal, attacked


def process_age_s() -> float:
    """Seconds since this process started (imports included: torch alone takes several)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


def wrk_script(path: Path, text: str) -> Path:
    body = json.dumps({"user_text": text, "mode": "fast"}, ensure_ascii=False)
    path.write_text(ATTACK_SCRIPT.format(body=body), encoding="utf-8")
    return path


def describe(result: WrkResult) -> str:
    return f"{result.rps:8.1f} req/s   p99 {result.p99 * 1e3:7.2f} ms   failures {result.failures}"


def main() -> int:
    if shutil.which("wrk") is None:
        raise SystemExit("this benchmark needs wrk: `apt-get install wrk`, or `make bench` as root")
    work = Path(tempfile.mkdtemp(prefix="bench-attack-"))
    export(train_checkpoints(work / "ckpts", steps=1)[-1], work / "exports", make_current=True)
    text = hangul_with_cues(ServeSettings().max_user_text_chars)
    attack_script = wrk_script(work / "wrk_attack.lua", text)
    typical_script = wrk_script(work / "wrk_typical.lua", TYPICAL)

    server = start_ours(work / "exports", warmup_steps=2, host="127.0.0.1")
    scripts = {"idle": None, "attacked": attack_script, "typical": typical_script}
    rounds: dict[str, list[WrkResult]] = {kind: [] for kind in scripts}
    extra: dict[str, list[WrkResult]] = {"attacked": [], "typical": []}
    round_s = WARMUP_S + SECONDS + 1
    try:
        server.wait_ready("/ready")
        for _ in range(ROUNDS):
            for kind, script in scripts.items():
                if process_age_s() + round_s + STOP_S > BUDGET_S:
                    break  # stay within the time budget: fewer rounds rather than a long run
                normal, others = run_round(server.url + "/dna/create", script)
                rounds[kind].append(normal)
                if others is not None:
                    extra[kind].append(others)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"lf-serve, 1 process; {NORMAL_CONNECTIONS} normal connections; attackers: "
        f"{ATTACK_CONNECTIONS} connections posting {len(text):,} chars of worst-case text"
    )
    for kind, results in rounds.items():
        for index, result in enumerate(results):
            print(f"normal clients, extra conns {kind:<8} #{index + 1}: {describe(result)}")
    for kind, results in extra.items():
        for index, result in enumerate(results):
            print(f"the 2 extra connections, {kind:<8} #{index + 1}: {describe(result)}")
    best = {kind: max(results, key=lambda r: r.rps) for kind, results in rounds.items() if results}
    if "typical" in best:
        # Calibration: 2 extra connections of typical briefs. With the server saturated they
        # take their share (6/8) whatever the parser costs: the best any parser could do.
        floor = best["typical"].rps / best["idle"].rps
        print(f"calibration, extra connections sending a typical brief: {floor:.2f}x req/s")
    rps_ratio = best["attacked"].rps / best["idle"].rps
    p99_ratio = best["attacked"].p99 / best["idle"].p99
    print(f"ours   (normal clients, attackers active, best round): {describe(best['attacked'])}")
    print(f"anchor (normal clients, attackers idle, best round):   {describe(best['idle'])}")
    print(f"req/s ratio attacked/idle: {rps_ratio:.2f}x (target >= {TARGET_RPS_RATIO}x)")
    print(f"p99 ratio attacked/idle:   {p99_ratio:.2f}x (target <= {TARGET_P99_RATIO}x)")
    print(f"wall time: {process_age_s():.0f} s (budget {BUDGET_S:.0f} s)")
    ok = rps_ratio >= TARGET_RPS_RATIO and p99_ratio <= TARGET_P99_RATIO
    print("PASS" if ok else "MISS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
