"""`python -m benchmarks.soak [--minutes 10]` (`make soak`): does hopwatch see every break in
time, raise no false alarm, and keep its memory flat over a long run with faults and restarts?

The demo system (`hopwatch demo --shop-only`: shop API, Kafka broker, worker, webhook sender)
is watched by a real `hopwatch run` of the demo's flows at a tenth of their intervals (10x
compressed). Every minute one fault is switched on through the shop's `/faults` for 20 s and
then cleared; hopwatch is restarted (SIGTERM, start again on the same store) twice, in quiet
spells. Loopback only; bounded by --minutes.

From the store (every run of every instance): each fault's detection time per broken link
(from switching it on to the end of the first run's broken step, when /metrics says so; goal
≤ the flow's interval + the step's deadline + the time the detecting run spent on its earlier
hops), recovery time after clearing (until the flow passes STABLE_PASSES runs in a row), and
false alarms (a failure outside any fault, or after its flow had recovered; goal 0); failures
between a flow's first pass and its recovery are listed as the fault's relapses. Memory: the
RSS of the longest-lived instance at its start (after a warm-up), middle and end (goal flat
within 10 %). Prints the figures and writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from monitor.demo.orders_table import default_url

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
SLOT_S = 60.0  # one fault per slot
FAULT_ON_S, FAULT_OFF_S, RESTART_AT_S = 15.0, 35.0, 50.0  # within each slot
RESTART_SLOTS = (0, 1)  # early: the last instance then lives long enough to judge its memory
# What the soak's own clock cannot resolve: the fault is switched by a request and stamped before
# it, a deadline is a timer that fires when the loop gets to it, and the run's start jitters.
SLACK_S = 0.25
# A flow has recovered from a fault once it passed this many runs in a row (or every run it
# had before the next fault, when fewer).
STABLE_PASSES = 3
WARM_UP_S = 30.0  # an instance's memory is taken from this long after its start
RSS_EVERY_S = 5.0
COMPRESS = {"interval: 5s": "interval: 500ms", "interval: 10s": "interval: 1s"}
FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("API answers 503", {"status": 503, "paths": ["/orders"]}),
    ("API slow, 800 ms", {"latency_ms": 800, "paths": ["/orders"]}),
    ("webhooks dropped", {"webhook_drop": True}),
    ("API answers a wrong body", {"wrong_body": True, "paths": ["/orders"]}),
    ("webhooks forged", {"webhook_bad_signature": True}),
    ("Kafka broker stopped", {"broker_stopped": True}),
    ("worker stopped", {"worker_stopped": True}),
    ("webhooks delivered twice", {"webhook_duplicate": True}),
    ("API hangs", {"hang": True, "paths": ["/orders"]}),
    ("worker slow, 12 s", {"worker_delay_ms": 12000}),
]


@dataclass(frozen=True)
class Run:
    flow: str
    variant: str
    started_at: float
    finished_at: float
    outcome: str
    broken_step: str | None
    reason: str | None
    broken_offset_s: float = 0.0  # when the broken step began, from the run's start
    broken_end_s: float | None = None  # when it ended (its verdict reached /metrics), likewise


@dataclass
class Window:
    """One injected fault: when it was switched on and off, and what it broke."""

    fault: str
    on: float
    off: float
    detected_s: float | None = None  # the first break of any link
    links: dict[str, dict[str, Any]] = field(default_factory=dict)  # "flow/step" → figures
    recovery_s: dict[str, float | None] = field(default_factory=dict)  # "flow/variant" → s
    # Failures after a flow's first pass, before it passed STABLE_PASSES times in a row: the
    # fault's tail in the system (a broker back with empty storage answers a produce with an
    # error, a consumer group rebalances), listed so they are seen, not false alarms.
    relapses: list[str] = field(default_factory=list)


def attribute(runs: list[Run], windows: list[Window], goals: dict[str, float]) -> list[Run]:
    """Fill each window's broken links (detection time, reasons, goal) and recovery times;
    return the false alarms: failures that no window explains. A failure is explained by a
    fault that was on when it ended, or was on when its run started, or whose flow has not
    passed STABLE_PASSES runs in a row since the fault went off (still recovering; a failure
    after its first pass is listed in the window's relapses)."""
    by_flow: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: r.started_at):
        by_flow.setdefault((run.flow, run.variant), []).append(run)
    healed: dict[tuple[int, tuple[str, str]], float] = {}  # stable again after the fault
    first_pass: dict[tuple[int, tuple[str, str]], float] = {}
    # The next fault ends a fault's reach: a slow flow may not run STABLE_PASSES times before it.
    ends = [w.on for w in windows[1:]] + [float("inf")]
    for i, window in enumerate(windows):
        for key, flow_runs in by_flow.items():
            after = [r for r in flow_runs if window.off <= r.started_at < ends[i]]
            passes = [j for j, r in enumerate(after) if r.outcome == "success"]
            first_pass[i, key] = after[passes[0]].started_at if passes else float("inf")
            healed[i, key] = next(
                (after[j].started_at for j in passes
                 if all(r.outcome == "success" for r in after[j : j + STABLE_PASSES])),
                float("inf"),
            )  # fmt: skip
    false_alarms = []
    broke: dict[int, set[tuple[str, str]]] = {i: set() for i in range(len(windows))}
    for run in runs:
        if run.outcome != "failure":
            continue
        key = (run.flow, run.variant)
        for i, window in enumerate(windows):
            if run.finished_at >= window.on and (
                run.started_at <= window.off or run.started_at < min(healed[i, key], ends[i])
            ):
                # A flow's runs never overlap: one in flight when the fault came holds the next
                # start back by what it still had to run, which no monitor could see past.
                held = max(
                    (r.finished_at - window.on for r in by_flow[key]
                     if r.started_at <= window.on < r.finished_at and r is not run),
                    default=0.0,
                )  # fmt: skip
                # A fault that builds up (a backlog behind a slow API) breaks a link only once
                # it has grown: a run that started under the fault and passed shows the link
                # still worked, and held the next start back until it ended (as `held`), so
                # the goal counts from that end.
                passed = max(
                    (r.finished_at - window.on for r in by_flow[key]
                     if r.outcome == "success" and window.on <= r.started_at < run.started_at),
                    default=0.0,
                )  # fmt: skip
                _note_break(window, run, goals, held, passed)
                if run.started_at >= first_pass[i, key]:
                    window.relapses.append(f"{run.flow}/{run.broken_step} ({run.reason})")
                broke[i].add(key)
                break
        else:
            false_alarms.append(run)
    for i, window in enumerate(windows):
        window.detected_s = min((s["detected_s"] for s in window.links.values()), default=None)
        for flow, variant in sorted(broke[i]):
            at = healed[i, (flow, variant)]
            window.recovery_s[f"{flow}/{variant}"] = (
                None if at == float("inf") else round(at - window.off, 2)
            )
    return false_alarms


def _note_break(
    window: Window, run: Run, goals: dict[str, float], held: float = 0.0, passed: float = 0.0
) -> None:
    link = f"{run.flow}/{run.broken_step}"
    seen = window.links.setdefault(
        link,
        {"detected_s": None, "reasons": {}, "failed_runs": 0, "goal_s": None},
    )
    seen["failed_runs"] += 1
    seen["reasons"][run.reason] = seen["reasons"].get(run.reason, 0) + 1
    # The hops reach /metrics when they are done, before the run's cleanup: the broken step's
    # end is when hopwatch said so (the run's end for runs stored without step timings).
    said = run.finished_at if run.broken_end_s is None else run.started_at + run.broken_end_s
    detected = max(0.0, said - window.on)
    if seen["detected_s"] is None or detected < seen["detected_s"]:
        seen["detected_s"] = round(detected, 2)
        # The detecting run reached the broken step only after its earlier hops: their time
        # is part of that run's reach, not the monitor's delay in seeing the break.
        goal = goals.get(link)
        seen["earlier_hops_s"] = round(run.broken_offset_s, 2)
        seen["held_s"] = round(held, 2)
        seen["passed_s"] = round(passed, 2)
        reach = run.broken_offset_s + held + passed
        seen["goal_s"] = None if goal is None else round(goal + reach, 2)


def detection_goals(flows_file: Path) -> dict[str, float]:
    """Per link "flow/step": the flow's interval plus the step's deadline (its `within`, else
    the run's timeout), each jitter included: a break must show within one run's reach. The
    detecting run's earlier hops (the broken step's offset in it) are added per break."""
    from monitor.config import load

    goals = {}
    for flow in load([flows_file]).flows:
        for step in flow.steps:
            deadline = getattr(step, "within", None) or flow.timeout
            goals[f"{flow.name}/{step.name}"] = round(flow.interval + flow.spread + deadline, 2)
    return goals


def read_runs(db: Path) -> list[Run]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT r.flow, r.variant, r.started_at, r.finished_at, r.outcome, r.broken_step,"
            " r.reason, COALESCE(s.offset_s, 0), s.offset_s + s.duration_s FROM runs r"
            " LEFT JOIN step_results s"
            " ON s.run_id = r.id AND s.name = r.broken_step AND NOT s.cleanup"
            " ORDER BY r.started_at"
        ).fetchall()
    return [Run(*row) for row in rows]


# --- the processes ---------------------------------------------------------------------------


def free_port() -> int:
    from monitor.demo.broker import free_port as free

    return free()


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _answers(url: str, within: float) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer in {within:.0f} s")
            await asyncio.sleep(0.2)


@dataclass
class Soak:
    minutes: float
    folder: Path
    first_fault: int = 0  # where in FAULTS the first minute starts
    shop: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    public: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    admin: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    kafka: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    events: list[dict[str, Any]] = field(default_factory=list)
    rss: list[tuple[float, int, float]] = field(default_factory=list)  # (t, pid, MiB)
    instances: list[tuple[int, float, float | None]] = field(default_factory=list)
    hopwatch: asyncio.subprocess.Process | None = None

    @property
    def db(self) -> Path:
        return self.folder / "soak.db"

    @property
    def orders_db(self) -> str:
        """The table the demo's worker writes and checkout's sql step reads back."""
        return default_url(self.folder)

    def log(self, what: str, **more: Any) -> None:
        self.events.append({"at": time.time(), "what": what, **more})
        print(f"  {time.strftime('%H:%M:%S')} {what} {more or ''}", flush=True)

    async def start_demo(self) -> asyncio.subprocess.Process:
        log = (self.folder / "demo.log").open("wb")
        demo = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "monitor", "demo", "--shop-only",
            "--shop-listen", self.shop, "--kafka-listen", self.kafka, "--listen", self.public,
            "--orders-db", self.orders_db, stdout=log, stderr=log,
        )  # fmt: skip
        await _answers(f"http://{self.shop}/faults", 60)
        return demo

    def flows(self) -> Path:
        from monitor.demo.runner import demo_flows_file

        path = demo_flows_file(f"http://{self.shop}", self.kafka, self.folder, self.orders_db)
        text = path.read_text()
        for slow, fast in COMPRESS.items():
            text = text.replace(slow, fast)
        path.write_text(text)
        return path

    async def start_hopwatch(self, flows: Path) -> None:
        from monitor.demo.webhooks import DEMO_SECRET

        log = (self.folder / "hopwatch.log").open("ab")
        env = {**os.environ, "HOPWATCH_DEMO_WEBHOOK_SECRET": DEMO_SECRET}
        self.hopwatch = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "monitor", "run", str(flows), "--listen", self.public,
            "--admin-listen", self.admin, "--store", str(self.db), "--grace", "5",
            "--log-level", "warning", stdout=log, stderr=log, env=env,
        )  # fmt: skip
        await _answers(f"http://{self.admin}/metrics", 60)
        self.instances.append((self.hopwatch.pid, time.time(), None))
        self.log("hopwatch started", pid=self.hopwatch.pid)

    async def stop_hopwatch(self) -> None:
        proc = self.hopwatch
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        pid, began, _ = self.instances[-1]
        self.instances[-1] = (pid, began, time.time())
        self.log("hopwatch stopped", pid=pid, exit=code)
        self.hopwatch = None

    async def set_faults(self, body: dict[str, Any] | None) -> None:
        async with aiohttp.ClientSession() as http:
            if body is None:
                async with http.delete(f"http://{self.shop}/faults") as resp:
                    resp.raise_for_status()
            else:
                async with http.post(f"http://{self.shop}/faults", json=body) as resp:
                    resp.raise_for_status()

    async def sample_memory(self) -> None:
        while True:
            if self.hopwatch is not None and (mib := rss_mib(self.hopwatch.pid)) is not None:
                self.rss.append((time.time(), self.hopwatch.pid, round(mib, 1)))
            await asyncio.sleep(RSS_EVERY_S)

    async def run(self) -> list[Window]:
        slots = max(1, round(self.minutes))
        flows = self.flows()
        demo = await self.start_demo()
        windows: list[Window] = []
        sampler = asyncio.create_task(self.sample_memory())
        try:
            await self.start_hopwatch(flows)
            began = time.monotonic()
            for slot in range(slots):
                at = began + slot * SLOT_S
                name, body = FAULTS[(self.first_fault + slot) % len(FAULTS)]
                await _until(at + FAULT_ON_S)
                await self.set_faults(body)
                windows.append(Window(name, time.time(), float("inf")))
                self.log("fault on", fault=name)
                await _until(at + FAULT_OFF_S)
                await self.set_faults(None)
                windows[-1].off = time.time()
                self.log("fault off", fault=name)
                if slot in RESTART_SLOTS and slot < slots - 1:
                    await _until(at + RESTART_AT_S)
                    await self.stop_hopwatch()
                    await self.start_hopwatch(flows)
            await _until(began + slots * SLOT_S)
        finally:
            sampler.cancel()
            await self.stop_hopwatch()
            await self.stop_demo(demo)
        return windows

    async def stop_demo(self, demo: asyncio.subprocess.Process) -> None:
        """SIGTERM, and SIGKILL after 30 s (its broker dies with it): the figures come from
        hopwatch's store, so a demo slow to stop is noted, never a lost soak."""
        began = time.monotonic()
        demo.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(demo.wait(), 30)
        except TimeoutError:
            demo.kill()
            await demo.wait()
            self.log("demo did not stop within 30 s of SIGTERM: killed")
        else:
            self.log("demo stopped", seconds=round(time.monotonic() - began, 1))


async def _until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))


def memory(soak: Soak) -> dict[str, Any]:
    """The longest-lived instance's RSS after its warm-up, at its middle and at its end."""
    pid, began, ended = max(soak.instances, key=lambda i: (i[2] or time.time()) - i[1])
    samples = [(t, mib) for t, p, mib in soak.rss if p == pid and t >= began + WARM_UP_S]
    if len(samples) < 3:
        return {"pid": pid, "note": "too short to judge (fewer than 3 samples after warm-up)"}
    start, middle, end = samples[0], samples[len(samples) // 2], samples[-1]
    growth = (end[1] - start[1]) / start[1]
    return {
        "pid": pid,
        "lived_s": round((ended or time.time()) - began),
        "start_mib": start[1], "middle_mib": middle[1], "end_mib": end[1],
        "peak_mib": max(mib for _, mib in samples),
        "growth": round(growth, 4),
        "flat_within_10pct": abs(growth) <= 0.10 and abs(middle[1] - start[1]) / start[1] <= 0.10,
    }  # fmt: skip


def late(seen: dict[str, Any]) -> bool:
    """Whether a link's break was said later than its goal, beyond SLACK_S."""
    return seen["goal_s"] is not None and seen["detected_s"] > seen["goal_s"] + SLACK_S


def _hops(seen: dict[str, Any]) -> str:
    parts = []
    if (hops := seen.get("earlier_hops_s") or 0.0) >= 0.05:
        parts.append(f"{hops:.1f} s of earlier hops")
    if (held := seen.get("held_s") or 0.0) >= 0.05:
        parts.append(f"{held:.1f} s of a run in flight")
    if (passed := seen.get("passed_s") or 0.0) >= 0.05:
        parts.append(f"{passed:.1f} s while it still passed")
    return f" (incl. {', '.join(parts)})" if parts else ""


def report(result: dict[str, Any]) -> str:
    lines = ["| fault | broken link (reasons) | detected in | goal | met | recovered in |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for w in result["windows"]:
        recovery = ", ".join(
            f"{k} {'never' if v is None else f'{v:.1f} s'}" for k, v in w["recovery_s"].items()
        )
        if not w["links"]:
            lines.append(f"| {w['fault']} | NOT DETECTED | — | — | no | — |")
        for link, s in sorted(w["links"].items(), key=lambda kv: kv[1]["detected_s"]):
            reasons = ", ".join(f"{r} x{n}" for r, n in s["reasons"].items())
            met = "NO" if late(s) else "yes"
            lines.append(
                f"| {w['fault']} | {link} ({reasons}) | {s['detected_s']:.1f} s | "
                f"{s['goal_s']} s{_hops(s)} | {met} | {recovery} |"
            )
            recovery = ""
    mem = result["memory"]
    lines += [
        "",
        f"a break is late (met: NO) when said more than {SLACK_S:g} s after its goal",
        "relapses (failures after a flow's first pass, before "
        f"{STABLE_PASSES} in a row): "
        + (
            ", ".join(f"{w['fault']}: {r}" for w in result["windows"] for r in w["relapses"])
            or "none"
        ),
        f"false alarms: {len(result['false_alarms'])} (goal 0); runs stored: "
        f"{result['runs']} ({result['outcomes']}); hopwatch restarts: {result['restarts']}",
        "memory (RSS of the longest-lived instance): "
        + (
            f"{mem['start_mib']} → {mem['middle_mib']} → {mem['end_mib']} MiB "
            f"({mem['growth']:+.1%}, flat within 10 %: {mem['flat_within_10pct']}) over "
            f"{mem['lived_s']} s"
            if "start_mib" in mem
            else mem["note"]
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="one fault per minute")
    parser.add_argument(
        "--first-fault", type=int, default=0, help=f"start at this fault (0-{len(FAULTS) - 1})"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    # The store and the logs stay beside the JSON (results/ is git-ignored) for a second look.
    folder = args.out.parent / f"{args.out.stem}-files"
    folder.mkdir(parents=True, exist_ok=True)
    for old in ("soak.db", "soak.db-wal", "soak.db-shm", "hopwatch.log"):
        (folder / old).unlink(missing_ok=True)  # a previous soak's runs must not count
    soak = Soak(args.minutes, folder, args.first_fault)
    restarts = min(len(RESTART_SLOTS), max(0, round(args.minutes) - 1))
    print(f"soak: {args.minutes:g} minutes, a fault a minute, {restarts} restarts", flush=True)
    windows = asyncio.run(soak.run())
    runs = read_runs(soak.db)
    goals = detection_goals(folder / "demo-flows.yaml")
    false_alarms = attribute(runs, windows, goals)
    outcomes: dict[str, int] = {}
    for run in runs:
        outcomes[run.outcome] = outcomes.get(run.outcome, 0) + 1
    result = {
        "minutes": args.minutes,
        "first_fault": args.first_fault,
        "windows": [asdict(w) for w in windows],
        "false_alarms": [asdict(r) for r in false_alarms],
        "runs": len(runs),
        "outcomes": outcomes,
        "restarts": len(soak.instances) - 1,
        "memory": memory(soak),
        "rss_samples": soak.rss,
        "events": soak.events,
    }
    text = report(result)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {args.out}")
    missed = any(
        not w["links"] or any(late(s) for s in w["links"].values()) for w in result["windows"]
    )
    return 1 if false_alarms or missed else 0


if __name__ == "__main__":
    sys.exit(main())
