"""Instructions per webhook, counted by callgrind: the webhook part's figures (benchmarks.webhooks)
without this VM's CPU-time noise, to judge small cuts.

    python -m benchmarks.webhook_instructions --part all --count 1000
    python -m benchmarks.webhook_instructions --part alone --count 1000 --no-valgrind

Each part is the webhook part's own function (the same engine, listener, sender and batches), run
in a child process under `valgrind --tool=callgrind --instr-atstart=no` pinned to the monitor
core, with the sender (benchmarks.senders) on the other core. The child warms up (at least
WARMUP_BATCHES batches, and for hopwatch until the correlator's table of finished expectations
is full), then switches callgrind's instrumentation on for `--count` webhooks in whole batches
and off again (`callgrind_control -i`), so the count is the steady state's alone: what the
process did for those webhooks, its own request to the sender per batch included, as in the
CPU-time figures. The handler's timing wrapper is left out. The ratios are the issue's targets:
the bare server's instructions per request over hopwatch's per webhook (≥ 70 % alone, ≥ 50 %
with the run). The callgrind files stay in benchmarks/results/ for callgrind_annotate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Final

from benchmarks.common import (
    ROOT,
    cores,
    free_port,
    run_child,
    start_pinned,
    stop_process,
    wait_http,
)

PARTS: Final = {
    "bare": "webhooks.bare_aiohttp",
    "alone": "webhooks.hopwatch_receiver",
    "run": "webhooks.hopwatch_webhooks",
}
TARGETS: Final = {"alone": 0.70, "run": 0.50}
WARMUP_BATCHES: Final = 5
BATCH: Final = 100
OUT: Final = ROOT / "benchmarks" / "results"


def measure(
    part: str, driver: str, count: int, *, valgrind: bool = True, out: Path = OUT
) -> dict[str, Any]:
    """Run `part` once for `count` webhooks after its warm-up; its result, with
    `instructions_per_webhook` when counted under callgrind (its file in `out`)."""
    out_file = out / f"callgrind.{part}.out"
    prefix = []
    if valgrind:
        out_file.unlink(missing_ok=True)
        prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        prefix.append(f"--callgrind-out-file={out_file}")
    args = {
        "driver": driver,
        "batch": BATCH,
        "webhooks": count,
        "warmup_batches": WARMUP_BATCHES,
        "warmup_limit_s": 3600.0,  # under valgrind the correlator fills slowly
        "time_handler": False,
        "callgrind": valgrind,
    }
    monitor_core, _ = cores()
    result = run_child(PARTS[part], args, monitor_core, 7200.0, prefix=prefix)
    ok = result["runs"] - result["failed"]
    if valgrind and ok:
        result["instructions"] = collected(out_file)
        result["instructions_per_webhook"] = round(result["instructions"] / ok)
    return result


def collected(out_file: Path) -> int:
    """The instructions callgrind counted, from its output file's `totals:` line (its
    `summary:` line says 0 when instrumentation started off)."""
    for line in out_file.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise ValueError(f"{out_file}: no totals line")


def report(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per part, and each hopwatch part as a share of the bare server."""
    lines = []
    bare = results.get("bare", {}).get("instructions_per_webhook")
    for part, result in results.items():
        per = result.get("instructions_per_webhook")
        line = f"{part:5}: {result['runs'] - result['failed']} webhooks ({result['failed']} failed)"
        if per is not None:
            line += f", {per:,} instructions each"
        else:
            line += f", {result['cpu_us_per_step']} µs CPU each"
        if per and bare and part in TARGETS:
            line += f", {bare / per:.1%} of the bare server (target ≥ {TARGETS[part]:.0%})"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--count", type=int, default=1000, help="webhooks counted (default 1000)")
    parser.add_argument(
        "--no-valgrind", action="store_true", help="run without callgrind (CPU time only)"
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"default {OUT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if not args.no_valgrind and shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install -y valgrind), or --no-valgrind")
    parts = list(PARTS) if args.part == "all" else [args.part]
    port = free_port()
    sender = start_pinned(
        [sys.executable, "-m", "benchmarks.senders", "webhooks", "--port", str(port)], cores()[1]
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        driver = f"http://127.0.0.1:{port}"
        wait_http(driver + "/ready")
        args.out.mkdir(parents=True, exist_ok=True)
        for part in parts:
            results[part] = measure(
                part, driver, args.count, valgrind=not args.no_valgrind, out=args.out
            )
    finally:
        stop_process(sender)
    print("\n".join(report(results)))
    (args.out / "webhook_instructions.json").write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any(result["failed"] for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
