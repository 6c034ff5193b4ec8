"""Cluster: what running several replicas costs and gives, measured on loopback with a real
Kafka-protocol broker (Tansu) and the machine's PostgreSQL as the shared store.

- handover: three replicas share ~300 flows (http checks, and webhook flows whose webhooks are
  all sent to one replica); one is killed with SIGKILL, another stopped with SIGTERM; per moved
  flow, the gap from the signal to its first run on another replica (read from the store);
- overlap: from the store's start/finish times, flows that had two runs in flight at once;
- arrivals: webhooks answered 2xx against the arrivals counted by all replicas (each exactly
  once), and the forwarding delay to the owner, beside the runs whose webhook reached their
  owner directly;
- scaling: scheduled http checks per second at saturation, one replica on one core against two
  replicas each pinned to its own core.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import report
from benchmarks.cluster_parts import (
    Replica,
    cluster_settings,
    database,
    emitter,
    histogram,
    http_flow,
    overlapping_flows,
    proc_stats,
    runs,
    total,
    until,
    webhook_flow,
)
from benchmarks.common import Ctx
from monitor.cluster.settings import DEFAULT_SESSION_TIMEOUT
from monitor.demo.broker import TansuBroker

FORWARD = "hopwatch_cluster_forward_delay_seconds"
DROPPED = "hopwatch_store_dropped_runs_total"


async def _view(session: aiohttp.ClientSession, replica: Replica, members: int, flows: int) -> Any:
    """The replica's `/api/v1/cluster` once it shows `members` members owning all `flows`."""
    view = await replica.get(session, "/api/v1/cluster")
    owned = [f for m in view["members"] for f in m["flows"]]
    ok = len(view["members"]) == members and len(owned) == len(set(owned)) == flows
    return view if ok else None


async def _start(session: aiohttp.ClientSession, replicas: list[Replica], flows: int) -> float:
    """Start the replicas (the first alone: it migrates the store); seconds until all agree."""
    t0 = time.monotonic()
    replicas[0].start()
    await until(lambda: replicas[0].get(session, "/readyz"), 60, f"{replicas[0].name} ready")
    for r in replicas[1:]:
        r.start()
    for r in replicas:
        await until(lambda r=r: _view(session, r, len(replicas), flows), 90, "all members")
    return time.monotonic() - t0


async def _first_runs_elsewhere(
    store: str, moved: set[str], since: float, gone: str
) -> dict[str, float] | None:
    first: dict[str, float] = {}
    for row in await runs(store):
        if row["flow"] in moved and row["started_at"] > since and row["replica"] != gone:
            first.setdefault(row["flow"], row["started_at"] - since)
    return first if len(first) == len(moved) else None


def _gaps(gaps: dict[str, float], **extra: Any) -> dict[str, Any]:
    values = sorted(gaps.values())
    return {"moved_flows": len(values), "gap_p50_s": round(statistics.median(values), 2),
            "gap_max_s": round(values[-1], 2), **extra}  # fmt: skip


def hist_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """PromQL's histogram_quantile over cumulative buckets (linear inside a bucket)."""
    count = buckets[-1][1] if buckets else 0.0
    if count <= 0:
        return float("nan")
    rank, lower, below = q * count, 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            width = cumulative - below
            return lower + (bound - lower) * ((rank - below) / width if width else 1.0)
        lower, below = bound, cumulative
    return lower


async def handover(args: dict[str, Any]) -> dict[str, Any]:
    """Three replicas, webhooks all to r1: arrivals counted once, then SIGKILL r3, SIGTERM r2."""
    n_http, n_hook = args["http_flows"], args["webhook_flows"]
    interval, session_s, partitions = args["interval"], args["session_timeout"], args["partitions"]
    broker = TansuBroker()
    await broker.start()
    tmp = Path(args.get("logs") or tempfile.mkdtemp(prefix="hopwatch-cluster-"))
    out: dict[str, Any] = {"flows": n_http + n_hook, "http_flows": n_http,
                           "webhook_flows": n_hook, "interval_s": interval,
                           "session_timeout_s": session_s, "partitions": partitions}  # fmt: skip
    try:
        async with database() as store, emitter() as (emit_port, emitted):
            flows = tmp / "flows.yaml"
            level = args.get("log_level", "warning")
            replicas = [Replica(f"r{i}", flows, store, tmp / f"r{i}.log", log_level=level)
                        for i in (1, 2, 3)]  # fmt: skip
            r1, r2, r3 = replicas
            group = f"bench-{uuid.uuid4().hex[:6]}"
            lines = [
                "settings:",
                "  max_concurrency: 256",
                cluster_settings(broker.bootstrap, group, partitions, session_s),
                "flows:",
            ]
            for i in range(n_http):
                lines += http_flow(f"check-{i}", args["target"] + "/ok", interval)
            for i in range(n_hook):
                lines += webhook_flow(f"hook-{i}", f"http://127.0.0.1:{emit_port}/emit",
                                      f"http://127.0.0.1:{r1.listen}", interval)  # fmt: skip
            flows.write_text("\n".join(lines) + "\n")
            async with aiohttp.ClientSession() as session:
                try:
                    out["start_s"] = round(await _start(session, replicas, out["flows"]), 1)
                    out["arrivals"] = await _arrivals(session, replicas, emitted, store, args)
                    emitted["on"] = True
                    out["sigkill"] = await _move(session, r3, signal.SIGKILL, r1, store, 2, out)
                    out["sigterm"] = await _move(session, r2, signal.SIGTERM, r1, store, 1, out)
                    await asyncio.sleep(2 * interval)
                finally:
                    for r in replicas:
                        await r.stop()
            rows = await runs(store)
            overlaps = overlapping_flows(rows)
            out["overlap"] = {"runs": len(rows), "flows_with_two_runs_in_flight": len(overlaps),
                              "examples": overlaps[:5]}  # fmt: skip
    finally:
        await broker.stop()
        broker.close_log()
    return out


async def _arrivals(
    session: aiohttp.ClientSession,
    replicas: list[Replica],
    emitted: dict[str, Any],
    store: str,
    args: dict[str, Any],
) -> dict[str, Any]:
    """Webhooks for `window` seconds, all to r1: sent (2xx) against every replica's counts."""
    view = await replicas[0].get(session, "/api/v1/cluster")
    owner = {f: m["replica"] for m in view["members"] for f in m["flows"]}
    started = time.time()
    emitted["on"] = True
    await asyncio.sleep(args["window"])
    emitted["on"] = False
    await asyncio.sleep(3.0 + args["interval"])  # the last deliveries land or their waits end
    samples = [await r.metrics(session) for r in replicas]
    outcomes: dict[str, float] = {}
    for s in samples:
        for outcome in ("matched", "unmatched", "late", "duplicate", "rejected", "invalid"):
            n = total(s, "hopwatch_arrivals_total", source="webhook", outcome=outcome)
            if n:
                outcomes[outcome] = outcomes.get(outcome, 0.0) + n
    forwarded = sum(total(s, "hopwatch_cluster_forwarded_arrivals_total", outcome="sent")
                    for s in samples)  # fmt: skip
    buckets: dict[float, float] = {}
    for s in samples:
        for bound, count in histogram(s, FORWARD):
            buckets[bound] = buckets.get(bound, 0.0) + count
    merged = sorted(buckets.items())
    # Run durations of the webhook flows: a forwarded webhook's run ends when its owner got it.
    direct: list[float] = []
    via: list[float] = []
    for row in await runs(store):
        if (
            row["flow"].startswith("hook-")
            and row["outcome"] == "success"
            and (row["started_at"] >= started)
        ):
            (direct if owner[row["flow"]] == replicas[0].name else via).append(row["duration_s"])
    return {
        "sent_2xx": emitted["sent"],
        "failed": emitted["failed"],
        "counted": {k: int(v) for k, v in outcomes.items()},
        "counted_total": int(sum(outcomes.values())),
        "forwarded": int(forwarded),
        "forward_delay_p50_ms": round(hist_quantile(merged, 0.5) * 1000, 2),
        "forward_delay_p99_ms": round(hist_quantile(merged, 0.99) * 1000, 2),
        "forward_delay_mean_ms": _mean_ms(samples),
        "run_ms_direct_p50": round(statistics.median(direct) * 1000, 2) if direct else None,
        "run_ms_forwarded_p50": round(statistics.median(via) * 1000, 2) if via else None,
        "runs_direct": len(direct),
        "runs_forwarded": len(via),
    }


def _mean_ms(samples: list[dict[str, float]]) -> float | None:
    count = sum(s.get(f"{FORWARD}_count", 0.0) for s in samples)
    seconds = sum(s.get(f"{FORWARD}_sum", 0.0) for s in samples)
    return round(seconds / count * 1000, 2) if count else None


async def _move(
    session: aiohttp.ClientSession,
    gone: Replica,
    sig: signal.Signals,
    watcher: Replica,
    store: str,
    left: int,
    out: dict[str, Any],
) -> dict[str, Any]:
    """Signal `gone`; the gap from then to each of its flows' first run on another replica."""
    view = await watcher.get(session, "/api/v1/cluster")
    moved = {f for m in view["members"] if m["replica"] == gone.name for f in m["flows"]}
    at = time.time()
    gone.signal(sig)
    code = await gone.wait(20) if sig == signal.SIGTERM else None
    view = await until(lambda: _view(session, watcher, left, out["flows"]), 90, f"{left} members")
    rebalanced = time.time() - at
    # When the watcher was handed its new partitions: the broker's share of the gap (the rest
    # is each flow's wait for its next slot on the grid, up to one interval).
    assigned = view["last_rebalance_unix"] - at
    limit = out["session_timeout_s"] + 30
    gaps = await until(lambda: _first_runs_elsewhere(store, moved, at, gone.name), limit,
                       f"{gone.name}'s flows running elsewhere", every=0.5)  # fmt: skip
    extra: dict[str, Any] = {"members_settled_s": round(rebalanced, 2),
                             "assigned_s": round(assigned, 2)}  # fmt: skip
    if code is not None:
        extra["exit_code"] = code
    return _gaps(gaps, **extra)


# -- throughput scaling -----------------------------------------------------------------------


async def scaling(args: dict[str, Any]) -> dict[str, Any]:
    """Scheduled http checks at saturation: one replica on one core, then two on two cores."""
    broker = TansuBroker()
    await broker.start()
    tmp = Path(tempfile.mkdtemp(prefix="hopwatch-scale-"))
    out: dict[str, Any] = {"flows": args["flows"], "interval_s": args["interval"]}
    try:
        async with database() as store, aiohttp.ClientSession() as session:
            for cores in ([args["cores"][0]], args["cores"]):
                out[f"replicas_{len(cores)}"] = await _saturate(
                    session, broker.bootstrap, store, cores, tmp, args
                )
    finally:
        await broker.stop()
        broker.close_log()
    one, two = out["replicas_1"]["checks_per_s"], out["replicas_2"]["checks_per_s"]
    out["ratio"] = round(two / one, 2) if one else None
    # What two replicas would carry with a core each to themselves: their work per CPU-second
    # against one replica's, times two (the figure a machine shared with the store, the
    # broker, the target and other jobs can still measure).
    per_cpu = (out["replicas_1"]["checks_per_cpu_s"], out["replicas_2"]["checks_per_cpu_s"])
    out["cpu_ratio"] = round(2 * per_cpu[1] / per_cpu[0], 2) if all(per_cpu) else None
    return out


async def _served(session: aiohttp.ClientSession, target: str) -> int:
    """Requests the target has answered so far."""
    async with session.get(f"{target}/stats") as response:
        return int((await response.json())["requests"])


async def _saturate(
    session: aiohttp.ClientSession,
    bootstrap: str,
    store: str,
    cores: list[int],
    tmp: Path,
    args: dict[str, Any],
) -> dict[str, Any]:
    n, interval = args["flows"], args["interval"]
    flows = tmp / f"scale{len(cores)}.yaml"
    group = f"scale-{uuid.uuid4().hex[:6]}"
    lines = [
        "settings:",
        "  max_concurrency: 256",
        cluster_settings(bootstrap, group, args["partitions"], DEFAULT_SESSION_TIMEOUT),
        "flows:",
    ]
    for i in range(n):
        lines += http_flow(f"load-{i}", args["target"] + "/ok", interval)
    flows.write_text("\n".join(lines) + "\n")
    replicas = [Replica(f"s{i}", flows, store, tmp / f"s{len(cores)}{i}.log", core=core)
                for i, core in enumerate(cores)]  # fmt: skip
    try:
        await _start(session, replicas, n)
        await asyncio.sleep(args["warmup"])
        # Checks are counted by the target (every check is one request to it): a /metrics
        # page of hundreds of flows takes a saturated replica seconds to render, which would
        # blur the window's edges, and a store that cannot keep up drops runs. The store's
        # rows (by start time) only split the count between the replicas.
        before = [await r.metrics(session) for r in replicas]
        await asyncio.sleep(1.0)
        served0 = await _served(session, args["target"])
        stats0, t0 = [proc_stats(r.pid) for r in replicas], time.time()
        await asyncio.sleep(args["duration"])
        stats1, t1 = [proc_stats(r.pid) for r in replicas], time.time()
        served = await _served(session, args["target"]) - served0
        after = [await r.metrics(session) for r in replicas]
    finally:
        for r in replicas:
            await r.stop()
    wall = t1 - t0
    counted: dict[str, list[str]] = {r.name: [] for r in replicas}
    for row in await runs(store):
        if t0 <= row["started_at"] < t1 and row["replica"] in counted:
            counted[row["replica"]].append(row["outcome"])
    stored = sum(len(v) for v in counted.values())
    drops = [int(total(a, DROPPED) - total(b, DROPPED)) for a, b in zip(after, before, strict=True)]
    each: list[dict[str, Any]] = []
    for r, a, dropped, s0, s1 in zip(replicas, after, drops, stats0, stats1, strict=True):
        # This replica's part of the target's count, by the rows in the store; unknown when a
        # store dropped runs (a saturated loop starves its own store writer).
        share = len(counted[r.name]) / stored if stored and not any(drops) else None
        checks = served * share if share is not None else None
        cpu = s1["cpu_s"] - s0["cpu_s"]
        each.append({
            "replica": r.name, "core": r.core,
            "owned_flows": int(a["hopwatch_cluster_owned_flows"]),
            "checks_per_s": round(checks / wall, 1) if checks is not None else None,
            "failed": sum(1 for o in counted[r.name] if o != "success"),
            "stored": len(counted[r.name]),
            "store_dropped": dropped,
            "cpu_share": round(cpu / wall, 3),
            "cpu_wait_share": round((s1["wait_s"] - s0["wait_s"]) / wall, 3),
            "cpu_us_per_check": round(cpu / checks * 1e6, 1) if checks else None,
        })  # fmt: skip
    cpu = sum(e["cpu_share"] for e in each)
    rate = served / wall
    return {"replicas": each, "checks_per_s": round(rate, 1),
            "checks_per_cpu_s": round(rate / cpu, 1) if cpu else None,
            "demand_per_s": round(n / interval), "window_s": round(wall, 1)}  # fmt: skip


# -- the part ---------------------------------------------------------------------------------


def part(ctx: Ctx) -> None:
    """Handover, overlap and arrivals on three replicas; then one against two replicas."""
    # The orchestrators run in this (unpinned) process: the replicas they start are pinned
    # (scaling) or left to the scheduler (handover), never confined to one core by inheritance.
    args = {"http_flows": 240, "webhook_flows": 60, "interval": 1.0, "partitions": 32,
            "session_timeout": DEFAULT_SESSION_TIMEOUT, "window": ctx.seconds(5.0, 10.0),
            "target": ctx.target.url}  # fmt: skip
    ctx.results["cluster"] = {}
    # The default session timeout, and (full run) a short one: the broker's share of a
    # handover grows with it (Tansu holds every JoinGroup half the session timeout, rounded up
    # to whole seconds).
    runs = (("handover", DEFAULT_SESSION_TIMEOUT), ("handover_short", 4.0))
    for key, session in runs[: 1 if ctx.quick else 2]:
        result = asyncio.run(handover(args | {"session_timeout": session}))
        ctx.results["cluster"][key] = result
        _log_handover(ctx, result)
    scale = {"flows": 2000, "interval": 0.25, "partitions": 32, "warmup": 3.0,
             "duration": ctx.seconds(6.0, 12.0), "cores": [ctx.monitor_core, ctx.target_core],
             "target": ctx.target.url}  # fmt: skip
    result = asyncio.run(scaling(scale))
    ctx.results["cluster"]["scaling"] = result
    ctx.log(f"  scaling: one replica {result['replicas_1']['checks_per_s']:,.0f}/s, two "
            f"{result['replicas_2']['checks_per_s']:,.0f}/s = {result['ratio']}x")  # fmt: skip


def _log_handover(ctx: Ctx, r: dict[str, Any]) -> None:
    for sig in ("sigkill", "sigterm"):
        g = r[sig]
        ctx.log(f"  session timeout {r['session_timeout_s']:g} s, {sig}: {g['moved_flows']} "
                f"flows moved, gap p50 {g['gap_p50_s']} s, max {g['gap_max_s']} s")  # fmt: skip
    a = r["arrivals"]
    ctx.log(f"  arrivals: sent {a['sent_2xx']}, counted {a['counted']} "
            f"(forwarded {a['forwarded']}), forward delay p50 {a['forward_delay_p50_ms']} ms "
            f"p99 {a['forward_delay_p99_ms']} ms")  # fmt: skip
    ctx.log(f"  overlap: {r['overlap']['flows_with_two_runs_in_flight']} flows of "
            f"{r['overlap']['runs']} runs")  # fmt: skip


def _handover_rows(h: dict[str, Any]) -> list[list[Any]]:
    setup = (f"3 replicas x {h['flows']} flows, interval {h['interval_s']:g} s, "
             f"session timeout {h['session_timeout_s']:g} s")  # fmt: skip
    return [
        [f"handover after {sig.upper()}", setup,
         f"{h[sig]['moved_flows']} flows: gap p50 {h[sig]['gap_p50_s']} s, max "
         f"{h[sig]['gap_max_s']} s (partitions assigned {h[sig].get('assigned_s')} s)"]
        for sig in ("sigkill", "sigterm")
    ]  # fmt: skip


def table(results: dict[str, Any]) -> str:
    """The cluster's figures, for the printed report and the README."""
    rows: list[list[Any]] = []
    for key in ("handover", "handover_short"):
        if key in results:
            rows += _handover_rows(results[key])
    h = results.get("handover")
    if h:
        o = h["overlap"]
        rows.append(["two runs of a flow in flight at once", f"{report.fmt(o['runs'])} runs",
                     str(o["flows_with_two_runs_in_flight"])])  # fmt: skip
        a = h["arrivals"]
        rows.append(["webhooks sent (2xx) → counted", "all sent to r1",
                     f"{a['sent_2xx']} → {a['counted_total']} {a['counted']}, "
                     f"{a['forwarded']} forwarded"])  # fmt: skip
        rows.append(["forwarding delay p50 / p99", "hopwatch_cluster_forward_delay_seconds",
                     f"{a['forward_delay_p50_ms']} / {a['forward_delay_p99_ms']} ms "
                     f"(mean {a['forward_delay_mean_ms']} ms)"])  # fmt: skip
        rows.append(["webhook run p50, direct vs forwarded", "run duration from the store",
                     f"{a['run_ms_direct_p50']} vs {a['run_ms_forwarded_p50']} ms"])  # fmt: skip
    s = results.get("scaling")
    if s:
        one, two = s["replicas_1"], s["replicas_2"]
        rows.append(["scheduled http checks/s at saturation",
                     f"{s['flows']} flows every {s['interval_s']:g} s",
                     f"1 replica {report.fmt(one['checks_per_s'])}, 2 replicas "
                     f"{report.fmt(two['checks_per_s'])} = {s['ratio']}x by rate, "
                     f"{s['cpu_ratio']}x from CPU per check"])  # fmt: skip
    return report.table(["what", "setup", "measured"], rows)


def targets(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's cluster targets against what this run measured."""
    out: list[dict[str, Any]] = []
    for key in ("handover", "handover_short"):
        h = cluster.get(key)
        if not h:
            continue
        session, interval = h["session_timeout_s"], h["interval_s"]
        for sig, limit in (("sigkill", session + interval), ("sigterm", 3 + interval)):
            gap = h[sig]["gap_max_s"]
            out.append({"target": f"every flow of a replica stopped by {sig.upper()} runs "
                        f"again (session timeout {session:g} s)", "wanted": f"≤ {limit:g} s",
                        "measured": f"max {gap} s", "ok": gap <= limit})  # fmt: skip
    h = cluster.get("handover")
    if h:
        n = h["overlap"]["flows_with_two_runs_in_flight"]
        out.append({"target": "flows with two runs in flight at once", "wanted": "0",
                    "measured": str(n), "ok": n == 0})  # fmt: skip
        a = h["arrivals"]
        once = a["counted_total"] == a["sent_2xx"] == a["counted"].get("matched")
        out.append({"target": "webhooks counted once across replicas (all sent to one)",
                    "wanted": "counted = sent", "measured": f"{a['counted_total']} of "
                    f"{a['sent_2xx']}", "ok": once})  # fmt: skip
    s = cluster.get("scaling")
    if s and s.get("ratio") is not None:
        out.append({"target": "two replicas on two cores vs one", "wanted": "≥ 1.8x",
                    "measured": f"{s['ratio']}x by rate ({s['cpu_ratio']}x from CPU per check)",
                    "ok": s["ratio"] >= 1.8})  # fmt: skip
    return out
