"""What every benchmark shares: core pinning, child processes, the machine's description and the
statistics (percentiles, Prometheus histogram quantiles, memory, CPU time).

Each measured part runs in its own process pinned to one core, so the CPU time and memory it
reports are its own and a benchmark never shares a core with the target it measures.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.demo.broker import free_port as free_port  # re-exported for the parts

RESULT_MARK = "BENCH-RESULT "
ROOT = Path(__file__).resolve().parent.parent


def cores() -> tuple[int, int]:
    """(monitor core, target core): the first two CPUs this process may use (one if only one)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) == 1:
        return allowed[0], allowed[0]
    return allowed[0], allowed[1]


def machine_info(uvloop_on: bool) -> dict[str, Any]:
    """CPU model, cores, memory, kernel, Python and library versions: the table's caption."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    import aiohttp

    info: dict[str, Any] = {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop_on,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if uvloop_on:
        import uvloop

        info["uvloop_version"] = getattr(uvloop, "__version__", "?")
    return info


# -- statistics ------------------------------------------------------------------------------


def median_round(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round whose rate is the median (the lower middle of an even count)."""
    return sorted(rounds, key=lambda r: r["steps_per_s"])[(len(rounds) - 1) // 2]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """min / p50 / p99 / max (and n) of seconds, in milliseconds."""
    ordered = sorted(values_s)
    return {
        "n": len(ordered),
        "min_ms": round(ordered[0] * 1000, 3) if ordered else math.nan,
        "p50_ms": round(percentile(ordered, 50) * 1000, 3),
        "p99_ms": round(percentile(ordered, 99) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3) if ordered else math.nan,
    }


@dataclass
class HistSnapshot:
    """Cumulative bucket counts of an unlabelled prometheus_client Histogram at one moment."""

    bounds: list[float]
    counts: list[float]
    total: float
    sum: float

    @classmethod
    def take(cls, histogram: Any) -> HistSnapshot:
        bounds: list[float] = []
        counts: list[float] = []
        total = total_sum = 0.0
        for metric in histogram.collect():
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    bounds.append(float(sample.labels["le"]))
                    counts.append(sample.value)
                elif sample.name.endswith("_count"):
                    total = sample.value
                elif sample.name.endswith("_sum"):
                    total_sum = sample.value
        return cls(bounds, counts, total, total_sum)

    def since(self, before: HistSnapshot) -> HistSnapshot:
        return HistSnapshot(
            self.bounds,
            [a - b for a, b in zip(self.counts, before.counts, strict=True)],
            self.total - before.total,
            self.sum - before.sum,
        )

    def quantile(self, q: float) -> float:
        """PromQL's histogram_quantile: linear inside the bucket; +Inf if beyond the last bound."""
        if self.total <= 0:
            return math.nan
        rank = q * self.total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            if count >= rank:
                if math.isinf(bound):
                    return math.inf
                width = count - lower_count
                frac = (rank - lower_count) / width if width > 0 else 1.0
                return lower_bound + (bound - lower_bound) * frac
            lower_bound, lower_count = bound, count
        return math.inf

    def summary_ms(self) -> dict[str, float]:
        """What the exported histogram says: n, mean, p50 and p99 (ms; inf = past 2.5 s)."""

        def ms(x: float) -> float:
            return x if math.isinf(x) or math.isnan(x) else round(x * 1000, 3)

        return {
            "n": int(self.total),
            "mean_ms": ms(self.sum / self.total) if self.total else math.nan,
            "p50_ms": ms(self.quantile(0.5)),
            "p99_ms": ms(self.quantile(0.99)),
        }


def rss_mib(pid: int | str = "self") -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM), MiB."""
    out = {"rss_mib": math.nan, "peak_mib": math.nan}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss_mib"] = round(int(line.split()[1]) / 1024, 1)
        elif line.startswith("VmHWM:"):
            out["peak_mib"] = round(int(line.split()[1]) / 1024, 1)
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds another process used (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))
    return ticks / os.sysconf("SC_CLK_TCK")


def runqueue_wait_s(pid: int | str = "self") -> float:
    """Seconds this process's threads spent runnable but waiting for a CPU (/proc/PID/schedstat):
    how much a shared machine took from the measurement."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def cpu_steal_s(core: int) -> float:
    """Seconds the hypervisor gave virtual CPU `core`'s time to others while it had work
    (/proc/stat steal): on a VM, stalls that no process in this machine can see or avoid."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{core} "):
                return int(line.split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


class CpuClock:
    """Wall time, CPU time and CPU-queue wait of this process between start() and stop()."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.waited = 0.0
        self._w0 = self._c0 = self._q0 = 0.0

    def start(self) -> None:
        self._q0 = runqueue_wait_s()
        self._w0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._w0
        self.cpu = time.process_time() - self._c0
        self.waited = runqueue_wait_s() - self._q0

    def summary(self) -> dict[str, float]:
        """CPU busy share, and the share of wall time spent waiting for a CPU others held."""
        return {
            "wall_s": round(self.wall, 3),
            "cpu_s": round(self.cpu, 3),
            "cpu_share": round(self.cpu / self.wall, 3) if self.wall else math.nan,
            "cpu_wait_share": round(self.waited / self.wall, 3) if self.wall else math.nan,
        }


class GcWatch:
    """Pauses of the garbage collector while installed: a full collection stalls the loop."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._t0)

    def __enter__(self) -> GcWatch:
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for gen, pauses in self.pauses.items():
            out[f"gen{gen}"] = {
                "count": len(pauses),
                "max_ms": round(max(pauses) * 1000, 2) if pauses else 0.0,
                "total_ms": round(sum(pauses) * 1000, 1),
            }
        return out


class LagProbe:
    """The benchmark's own fine-grained event-loop lag probe (every 5 ms), to see the short
    stalls that the monitor's 250 ms sampler cannot: a diagnostic, not what hopwatch exports."""

    def __init__(self, every: float = 0.005) -> None:
        self.every = every
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + self.every
            await asyncio.sleep(self.every)
            self.lags.append(max(0.0, loop.time() - planned))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> dict[str, float]:
        out = summary_ms(self.lags)
        out["stalls_over_20ms"] = sum(1 for x in self.lags if x > 0.020)
        return out


# -- processes -------------------------------------------------------------------------------


def _pinned(core: int) -> Any:
    def pin() -> None:
        os.sched_setaffinity(0, {core})

    return pin


def run_child(
    func: str, args: dict[str, Any], core: int, timeout: float, *, prefix: Sequence[str] = ()
) -> dict[str, Any]:
    """Run `benchmarks.<module>.<function>(args)` in a fresh process pinned to `core`, under
    `prefix` (a command such as valgrind's) when given."""
    cmd = [*prefix, sys.executable, "-m", "benchmarks.child", func, json.dumps(args)]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_pinned(core),
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            return result
    tail = "\n".join(proc.stderr.splitlines()[-15:])
    raise RuntimeError(f"{func} exited {proc.returncode} without a result:\n{tail}")


@contextmanager
def callgrind_collecting(on: bool) -> Iterator[None]:
    """When `on`, callgrind counts this process's instructions only inside the block (the
    process runs under `valgrind --tool=callgrind --instr-atstart=no`); a no-op otherwise."""
    if not on:
        yield
        return
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)


def start_pinned(cmd: list[str], core: int, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, cwd=ROOT, preexec_fn=_pinned(core), text=True, **kwargs)


def stop_process(proc: subprocess.Popen[str], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_http(url: str, timeout: float = 10.0) -> None:
    """Poll until `url` answers (a process we just started is listening), bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class Target:
    """The target server process: its base URL and pid."""

    url: str
    pid: int

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = get_json(self.url + "/stats")
        return result


@contextmanager
def target_server(core: int, uvloop_on: bool) -> Iterator[Target]:
    """Start benchmarks.target pinned to `core`; stop it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.target", "--port", str(port)]
    if not uvloop_on:
        cmd.append("--no-uvloop")
    proc = start_pinned(cmd, core)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/stats")
        yield Target(url=url, pid=proc.pid)
    finally:
        stop_process(proc)


# -- the run's shared state -----------------------------------------------------------------


@dataclass
class Ctx:
    """What the parts of one benchmark run share: mode, cores, the target, results so far."""

    quick: bool
    uvloop: bool
    monitor_core: int
    target_core: int
    target: Target
    results: dict[str, Any]
    log: Any = print

    def seconds(self, quick: float, full: float) -> float:
        return quick if self.quick else full

    def child(self, func: str, args: dict[str, Any], *, core: int | None = None) -> dict[str, Any]:
        """Run a measured child on the monitor core (or `core`), bounded in time."""
        args = {"uvloop": self.uvloop, "target": self.target.url, **args}
        budget = 90 + 4 * float(args.get("duration", 10)) + float(args.get("warmup", 0))
        steal, started = cpu_steal_s(self.monitor_core), time.perf_counter()
        result = run_child(func, args, self.monitor_core if core is None else core, budget)
        stolen = cpu_steal_s(self.monitor_core) - steal
        result["vm_steal_share"] = round(stolen / (time.perf_counter() - started), 3)
        return result

    def rows(self, part: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.results.setdefault(part, [])
        return rows


DELAY_MS = 50
TARGET_RATE = 1000.0  # the fidelity target: error p99 <= 2 ms at this rate
TARGET_LOAD = f"{TARGET_RATE:,.0f}/s"  # its row's label


def loads(ctx: Ctx, max_rate: float) -> list[tuple[str, float]]:
    """10 / 50 / 90 % of the maximum (and 150 %, overloaded, in a full run), plus 1,000/s."""
    shares = (0.1, 0.5, 0.9) if ctx.quick else (0.1, 0.5, 0.9, 1.5)
    out: list[tuple[str, float]] = [
        (f"{share:.0%} of max", float(round(share * max_rate))) for share in shares
    ]
    out.append((TARGET_LOAD, TARGET_RATE))
    return out
