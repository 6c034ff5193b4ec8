"""Side by side: Prometheus blackbox_exporter probing the same target through its /probe endpoint,
pinned to the monitor's core, so hopwatch's ratio to it is measured on this machine, never quoted.

The exporter runs as Debian ships it (`prometheus-blackbox-exporter`, an `http_2xx` module from a
temporary config). A driver process on the target's core calls /probe as Prometheus would and
reads back `probe_success` and `probe_duration_seconds`; the exporter's CPU time comes from
/proc. Each probe opens a fresh connection (blackbox_exporter has no reuse).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from benchmarks.common import (
    DELAY_MS,
    CpuClock,
    Ctx,
    free_port,
    loads,
    proc_cpu_s,
    runqueue_wait_s,
    start_pinned,
    stop_process,
    summary_ms,
    wait_http,
)
from benchmarks.loadgen import closed_loop, fetch_json, open_loop

BINARY = "prometheus-blackbox-exporter"
INSTALL_HINT = "apt-get install -y prometheus-blackbox-exporter"
CONFIG = """\
modules:
  http_2xx:
    prober: http
    timeout: 10s
    http:
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
"""


def binary() -> str | None:
    return shutil.which(BINARY)


@contextmanager
def exporter(core: int) -> Iterator[tuple[str, int]]:
    """Start blackbox_exporter pinned to `core` on a loopback port: (base URL, pid)."""
    path = binary()
    if path is None:
        raise FileNotFoundError(f"{BINARY} is not installed: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "blackbox.yml"
        config.write_text(CONFIG)
        port = free_port()
        proc = start_pinned(
            [path, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=error"],
            core,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/metrics")
            yield url, proc.pid
        finally:
            stop_process(proc)


def _parse(text: str) -> tuple[bool, float | None]:
    success, duration = False, None
    for line in text.splitlines():
        if line.startswith("probe_success "):
            success = line.split()[1] == "1"
        elif line.startswith("probe_duration_seconds "):
            duration = float(line.split()[1])
    return success, duration


def _probe_url(exporter_url: str, target: str) -> str:
    return f"{exporter_url}/probe?module=http_2xx&target={quote(target, safe='')}"


async def throughput(args: dict[str, Any]) -> dict[str, Any]:
    """Closed loop on /probe (target /ok) at `concurrency`: probes/s and exporter CPU per probe."""
    url = _probe_url(args["exporter"], args["target"] + "/ok")
    pid = args["pid"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def once() -> bool:
            async with session.get(url) as resp:
                ok, _ = _parse(await resp.text())
                return ok

        await closed_loop(16, 0.5, once)
        clock = CpuClock()
        cpu0, wait0 = proc_cpu_s(pid), runqueue_wait_s(pid)
        clock.start()
        ok, failed = await closed_loop(args["concurrency"], args["duration"], once)
        clock.stop()
        cpu, waited = proc_cpu_s(pid) - cpu0, runqueue_wait_s(pid) - wait0
    probes = ok + failed
    return {
        "runs": probes,
        "failed": failed,
        "wall_s": round(clock.wall, 3),
        "cpu_s": round(cpu, 3),
        "cpu_share": round(cpu / clock.wall, 3),
        "cpu_wait_share": round(waited / clock.wall, 3),
        "steps_per_s": round(probes / clock.wall, 1),
        "cpu_us_per_step": round(cpu / probes * 1e6, 1) if probes else None,
        "driver_cpu_share": round(clock.cpu / clock.wall, 3),
    }


async def fidelity(args: dict[str, Any]) -> dict[str, Any]:
    """Open loop at `rate` on /probe against /delay/<ms>: its reported duration minus the truth."""
    rate, pid = args["rate"], args["pid"]
    reported: dict[str, float] = {}
    failed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def fire(i: int) -> None:
            nonlocal failed
            key = f"bb{i}"
            target = f"{args['target']}/delay/{args['delay_ms']}?id={key}"
            try:
                async with session.get(_probe_url(args["exporter"], target)) as resp:
                    ok, duration = _parse(await resp.text())
            except aiohttp.ClientError:
                ok, duration = False, None
            if ok and duration is not None:
                reported[key] = duration
            else:
                failed += 1

        await fetch_json(args["target"] + "/truth")  # forget earlier requests
        await fetch_json(args["target"] + "/lag")
        cpu0, wait0 = proc_cpu_s(pid), runqueue_wait_s(pid)
        clock = CpuClock()
        clock.start()
        started = await open_loop(rate, args["duration"], fire)
        clock.stop()
        cpu, waited = proc_cpu_s(pid) - cpu0, runqueue_wait_s(pid) - wait0
    target_lag = await fetch_json(args["target"] + "/lag")
    truth: dict[str, float] = await fetch_json(args["target"] + "/truth")
    errors = [d - truth[k] for k, d in reported.items() if k in truth]
    return {
        "rate_target": rate,
        "rate_achieved": round((started - failed) / clock.wall, 1),  # done, incl. draining
        "runs": started,
        "failed": failed,
        "error": summary_ms(errors),
        "reported": summary_ms(list(reported.values())),
        "cpu_share": round(cpu / clock.wall, 3),
        "cpu_wait_share": round(waited / clock.wall, 3),
        "target_lag": target_lag,
    }


def _max_rate(ctx: Ctx, common: dict[str, Any]) -> float:
    """Its probes/s from the throughput part, or measured now if that part did not run."""
    for row in ctx.results.get("throughput", []):
        if row["tool"] == "blackbox_exporter":
            return float(row["steps_per_s"])
    args = {**common, "concurrency": 32, "duration": ctx.seconds(2.0, 6.0)}
    result = ctx.child("blackbox.throughput", args, core=ctx.target_core)
    ctx.results.setdefault("calibration", []).append({"tool": "blackbox_exporter", **result})
    ctx.log(f"  blackbox_exporter: {result['steps_per_s']:,.0f} probes/s")
    return float(result["steps_per_s"])


def part(ctx: Ctx) -> None:
    """Fidelity at 10/50/90 % of its own maximum (measured side by side with hopwatch by the
    throughput part) and at 1,000/s."""
    if binary() is None:
        ctx.log(f"  {BINARY} not found: install it with `{INSTALL_HINT}`; skipping this part")
        ctx.results.setdefault("skipped", {})["blackbox"] = f"not installed: {INSTALL_HINT}"
        return
    with exporter(ctx.monitor_core) as (url, pid):
        common = {"exporter": url, "pid": pid}
        top = _max_rate(ctx, common)
        base = {**common, "delay_ms": DELAY_MS, "duration": ctx.seconds(2.5, 6.0)}
        for label, rate in loads(ctx, top):
            fid = ctx.child("blackbox.fidelity", {**base, "rate": rate}, core=ctx.target_core)
            ctx.rows("fidelity").append(
                {"tool": "blackbox_exporter", "case": "fresh connection per probe",
                 "load": label, "reuse": False, **fid}
            )  # fmt: skip
            err = fid["error"]
            ctx.log(
                f"  blackbox_exporter, {label}: {fid['rate_achieved']:,.0f}/s, "
                f"error p50 {err['p50_ms']:.2f} ms, p99 {err['p99_ms']:.2f} ms"
            )
