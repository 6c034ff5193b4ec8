"""The benchmark's own arithmetic (its figures go in the README, so they must be right), and a
short real run of one part through the command users run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram

from benchmarks.common import HistSnapshot, percentile, summary_ms

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("values", "q", "want"),
    [([1, 2, 3, 4], 50, 2), ([1, 2, 3, 4], 99, 4), ([5], 1, 5), (list(range(1, 101)), 99, 99)],
)
def test_nearest_rank_percentile(values: list[float], q: float, want: float) -> None:
    assert percentile(sorted(values), q) == want


def test_summary_in_milliseconds() -> None:
    assert summary_ms([0.001, 0.002, 0.010]) == {
        "n": 3,
        "p50_ms": 2.0,
        "p99_ms": 10.0,
        "max_ms": 10.0,
    }


def test_histogram_quantile_matches_promql_interpolation() -> None:
    histogram = Histogram("lag", "x", buckets=(0.01, 0.1, 1.0), registry=CollectorRegistry())
    before = HistSnapshot.take(histogram)
    for value in [0.005] * 50 + [0.05] * 40 + [0.5] * 10:
        histogram.observe(value)
    delta = HistSnapshot.take(histogram).since(before)
    assert delta.total == 100
    assert delta.quantile(0.5) == pytest.approx(0.01)  # the 50th of 100 ends bucket one
    assert delta.quantile(0.9) == pytest.approx(0.1)
    assert delta.quantile(0.95) == pytest.approx(0.1 + 0.9 * 0.5)


def test_quick_throughput_run_prints_and_writes_its_figures(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "throughput",
            "--out",
            str(tmp_path / "bench.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "steps/s" in proc.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["machine"]
