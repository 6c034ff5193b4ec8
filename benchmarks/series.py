"""Series: what hopwatch costs Prometheus, the series its /metrics exposes and the time a scrape
takes to serve, per 1,000 links (a link is one hop of one flow).

Flows of two `http` steps against the target's /ok, loaded from YAML with `monitor.config.load`
as `hopwatch run` would, each run once (so every series a run touches is shown), then /metrics
scraped through the real admin listener in the text format (Prometheus's default), in
OpenMetrics, and in protobuf as Prometheus with native histograms on asks for it, each three
times. A series is what Prometheus stores: a sample line of the text formats; in protobuf a
counter or gauge, a native histogram (one series), or a classic histogram's buckets, count and
sum (the monitor's own lags), read with the official message types.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import Ctx, free_port
from monitor.config import load
from monitor.engine import Engine, Options

FORMATS = {
    "text": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",  # Prometheus without OpenMetrics
    "openmetrics": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    # Prometheus 2.42 with --enable-feature=native-histograms
    "protobuf": "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
    "encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
}
SCRAPES = 3
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def flows_yaml(n: int, url: str, settings: str) -> str:
    lines = [f"settings: {{max_concurrency: 256{settings}}}", "flows:"]
    step = f"kind: http, url: '{url}', expect: {{status: 200}}"
    for i in range(n):
        lines.append(f"  - {{name: flow{i}, steps: [{{name: a, {step}}}, {{name: b, {step}}}]}}")
    return "\n".join(lines) + "\n"


def series_of(body: str) -> Counter[str]:
    """Sample lines by family (the name without _bucket/_count/_sum/_total/_created)."""
    out: Counter[str] = Counter()
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for suffix in SUFFIXES:
            if name.endswith(suffix):
                out[suffix] += 1
                break
        out[name.removesuffix("_bucket")] += 0  # keep the family listed
        out["all"] += 1
    return out


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A delimited message's length prefix: (value, position after it)."""
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def protobuf_series_of(body: bytes) -> Counter[str]:
    """Series by kind of a protobuf scrape, as Prometheus with native histograms stores them."""
    from tests.fixtures import metrics_pb2  # the official message types (scripts/generate-…)

    out: Counter[str] = Counter()
    pos = 0
    while pos < len(body):
        size, pos = _varint(body, pos)
        family = metrics_pb2.MetricFamily()
        family.ParseFromString(body[pos : pos + size])
        pos += size
        for metric in family.metric:
            h = metric.histogram
            if family.type != metrics_pb2.HISTOGRAM:
                kind, n = "_total" if family.type == metrics_pb2.COUNTER else "other", 1
            elif h.zero_threshold > 0 or h.positive_span:
                kind, n = "native", 1
            else:  # classic: each bucket (+Inf among them), count and sum
                kind, n = "_bucket", len(h.bucket) + 2
            out[kind] += n
            out["all"] += n
    return out


async def hopwatch_series(args: dict[str, Any]) -> dict[str, Any]:
    """Load `flows` two-step flows, run each once, scrape /metrics in each format."""
    n = args["flows"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flows.yaml"
        path.write_text(flows_yaml(n, args["target"] + "/ok", args.get("settings", "")))
        config = load([path])
    admin = f"127.0.0.1:{free_port()}"
    engine = Engine(config, Options(grace=2.0, admin_listen=admin, settle_gc=True))
    await engine.start(schedule=False, admin=True)
    try:
        pairs = engine.select()
        results = await engine.run_once(pairs, concurrency=64)
        failed = sum(1 for r in results if r.outcome != "success")
        out: dict[str, Any] = {"flows": n, "links": 2 * n, "runs": len(results), "failed": failed}
        async with aiohttp.ClientSession() as session:
            for fmt, accept in FORMATS.items():
                times, cpu, size, counts = [], [], 0, Counter[str]()
                for _ in range(SCRAPES):
                    t0, c0 = time.perf_counter(), time.process_time()
                    async with session.get(f"http://{admin}/metrics",
                                           headers={"Accept": accept}) as resp:  # fmt: skip
                        body = await resp.read()
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                    size = len(body)
                    counts = (protobuf_series_of(body) if fmt == "protobuf"
                              else series_of(body.decode()))  # fmt: skip
                links = 2 * n
                out[fmt] = {
                    "series": counts["all"],
                    "series_per_link": round(counts["all"] / links, 2),
                    "bytes": size,
                    "serve_s": round(statistics.median(times), 3),
                    "first_serve_s": round(times[0], 3),  # labels rendered on the first
                    "serve_s_per_1000_links": round(statistics.median(times) / links * 1000, 4),
                    "cpu_s": round(statistics.median(cpu), 3),
                    "by_suffix": {k: counts[k] for k in (*SUFFIXES, "native")},
                }
        return out
    finally:
        await engine.stop()


def part(ctx: Ctx) -> None:
    """1,000 flows (2,000 links) and, in a full run, 5,000 flows (10,000 links)."""
    sizes = [1000] if ctx.quick else [1000, 5000]
    for flows in sizes:
        result = ctx.child("series.hopwatch_series", {"flows": flows, "duration": 30})
        ctx.rows("series").append(result)
        text, proto = result["text"], result["protobuf"]
        ctx.log(
            f"  {flows:,} flows ({result['links']:,} links): {text['series']:,} series "
            f"({text['series_per_link']}/link), {text['bytes'] / 1e6:.1f} MB, "
            f"served in {text['serve_s']:.2f} s ({text['cpu_s']:.2f} s CPU; "
            f"OpenMetrics {result['openmetrics']['serve_s']:.2f} s); protobuf + native: "
            f"{proto['series']:,} series ({proto['series_per_link']}/link), "
            f"{proto['bytes'] / 1e6:.1f} MB, {proto['serve_s']:.2f} s ({proto['cpu_s']:.2f} s CPU)"
        )


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| flows | links | format | series | per link | MB | served (CPU) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for fmt in FORMATS:
            f = r.get(fmt)
            if f is None:  # a result from before the format was measured
                continue
            lines.append(
                f"| {r['flows']:,} | {r['links']:,} | {fmt} | {f['series']:,} "
                f"| {f['series_per_link']} | {f['bytes'] / 1e6:.1f} "
                f"| {f['serve_s']:.2f} s ({f['cpu_s']:.2f} s) |"
            )
    return "\n".join(lines)
