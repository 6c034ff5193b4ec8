"""The canary judge: Kayenta's published vector, the judge's decisions, and its invariants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy.optimize import brentq
from scipy.stats import norm, rankdata

from monitor.gate.judge import clean_samples, judge, remove_outliers
from monitor.gate.mannwhitney import mann_whitney, mann_whitney_ci
from monitor.gate.verdict import Direction, JudgeConfig, MetricSamples, Verdict

# --- Kayenta's numbers ------------------------------------------------------------------------


def test_kayenta_vector() -> None:
    # kayenta-mannwhitney MannWhitneySuite "returns expected values" (tolerance 1e-6 there too).
    lower, upper, estimate = mann_whitney_ci([10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0], 0.95)
    assert lower == pytest.approx(6.0, abs=1e-6)
    assert upper == pytest.approx(39.0, abs=1e-6)
    assert estimate == pytest.approx(22.5, abs=1e-6)


def test_kayenta_vector_p_value() -> None:
    # The value Kayenta's suite records (commented out there) is the exact two-sided p-value.
    result = mann_whitney([10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0], 0.95)
    assert result.p_value == pytest.approx(0.02857142857142857, abs=1e-9)
    assert (result.lower, result.upper, result.estimate) == pytest.approx((6.0, 39.0, 22.5))


def _kayenta_wilcoxon_diff(mu: float, zq: float, x: np.ndarray, y: np.ndarray) -> float:
    """Kayenta's MannWhitney.wilcoxonDiff, line for line: ranks of (x - mu) ++ y."""
    n, m = len(x), len(y)
    ranks = rankdata(np.concatenate([x - mu, y]))
    dz = ranks[:n].sum() - n * (n + 1) / 2 - n * m / 2
    correction = 0.5 * np.sign(dz)
    _, ties = np.unique(ranks, return_counts=True)
    sigma = math.sqrt(n * m / 12 * ((n + m + 1) - (ties**3 - ties).sum() / ((n + m) * (n + m - 1))))
    return float((dz - correction) / sigma - zq)


def _kayenta_ci(x: np.ndarray, y: np.ndarray, confidence: float) -> tuple[float, float]:
    """Kayenta's calculateConfidenceInterval, with scipy's Brent solver for theirs."""
    mu_min, mu_max = float(x.min() - y.max()), float(x.max() - y.min())
    z = float(norm.ppf(1 - (1 - confidence) / 2))

    def find_root(zq: float) -> float:
        if _kayenta_wilcoxon_diff(mu_min, zq, x, y) <= 0:
            return mu_min
        if _kayenta_wilcoxon_diff(mu_max, zq, x, y) >= 0:
            return mu_max
        return float(brentq(lambda mu: _kayenta_wilcoxon_diff(mu, zq, x, y), mu_min, mu_max))

    return find_root(z), find_root(-z)


@pytest.mark.parametrize(
    ("seed", "ties"),
    [(1, False), (2, False), (3, True), (4, True), (5, True), (6, False)],
)
def test_interval_matches_kayentas_root_finding(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    n, m = (int(v) for v in rng.integers(3, 25, size=2))
    if ties:  # whole milliseconds: many ties inside and across the samples
        x = rng.integers(90, 110, size=n).astype(float)
        y = rng.integers(85, 105, size=m).astype(float)
    else:
        x, y = rng.lognormal(0.2, 0.5, size=n), rng.lognormal(0.0, 0.5, size=m)
    lower, upper, _ = mann_whitney_ci(x, y, 0.98)
    assert (lower, upper) == pytest.approx(_kayenta_ci(x, y, 0.98), abs=1e-9)


# --- cleaning ---------------------------------------------------------------------------------


def test_outliers_beyond_the_fences_are_dropped() -> None:
    values = [0.1 + i * 0.001 for i in range(200)] + [60.0]
    kept = remove_outliers(values)
    assert kept.size == 200
    assert kept.max() < 1.0


def test_nan_and_infinity_are_dropped_and_counted() -> None:
    kept, removed = clean_samples([0.1, math.nan, 0.2, math.inf], outliers=False)
    assert kept.tolist() == [0.1, 0.2]
    assert removed == 2


# --- the judge, table-driven ------------------------------------------------------------------

RNG = np.random.default_rng(42)
BASELINE_MS = RNG.normal(98.0, 5.0, size=40)


def _seconds(ms: np.ndarray) -> list[float]:
    return [float(v) / 1000.0 for v in ms]


def _latency(name: str, canary_ms: np.ndarray, *, critical: bool = False) -> MetricSamples:
    return MetricSamples(
        name=name,
        kind="latency",
        canary=_seconds(canary_ms),
        baseline=_seconds(BASELINE_MS),
        critical=critical,
    )


def _errors(name: str, canary_errors: int, baseline_errors: int, total: int = 50) -> MetricSamples:
    return MetricSamples(
        name=name,
        kind="error_ratio",
        canary=[1.0] * canary_errors + [0.0] * (total - canary_errors),
        baseline=[1.0] * baseline_errors + [0.0] * (total - baseline_errors),
    )


SAME = BASELINE_MS.copy()
SLOWER = BASELINE_MS + 114.0
FASTER = BASELINE_MS - 40.0
LINK = "checkout/create_order latency"

CASES = [
    pytest.param(
        [_latency(LINK, SAME)], "pass", 100.0, ["identical samples, Pass"], id="identical"
    ),
    pytest.param(
        [_latency(LINK, SLOWER), _errors("checkout/create_order errors", 0, 0)],
        "fail",
        50.0,
        [f"{LINK}: canary median", "+114ms", "High"],
        id="shifted-canary-fails",
    ),
    pytest.param(
        [
            MetricSamples(LINK, "latency", [0.2, 0.21], [0.1, 0.11]),
            MetricSamples("checkout/create_order errors", "error_ratio", [0.0, 1.0], [0.0, 0.0]),
        ],
        "inconclusive",
        None,
        ["no metric had enough data", "2 canary and 2 baseline samples, need 10 each, nodata"],
        id="two-samples-inconclusive",
    ),
    pytest.param(
        [_latency(LINK, SLOWER, critical=True)]
        + [_latency(f"checkout/step{i} latency", SAME) for i in range(9)],
        "fail",
        0.0,
        [f"critical metric failed ({LINK}): score 0"],
        id="critical-zeroes-score",
    ),
    pytest.param(
        [_errors("checkout/create_order errors", 6, 1)],
        "fail",
        0.0,
        ["canary error ratio 12.0% (6/50) vs 2.0% (1/50) baseline, +10.0 points", "High"],
        id="error-ratio-increase-fails",
    ),
    pytest.param(
        [_errors("checkout/create_order errors", 2, 0)],
        "pass",
        100.0,
        ["score 100.0: pass"],
        id="error-ratio-within-allowance",
    ),
    pytest.param(
        [_latency(LINK, FASTER)], "pass", 100.0, ["score 100.0: pass"], id="faster-passes"
    ),
    pytest.param(
        [_latency(LINK, SLOWER)] + [_latency(f"checkout/step{i} latency", SAME) for i in range(4)],
        "marginal",
        80.0,
        [f"{LINK}: canary median"],
        id="one-in-five-marginal",
    ),
]


@pytest.mark.parametrize(("metrics", "verdict", "score", "reason_parts"), CASES)
def test_judge(
    metrics: list[MetricSamples], verdict: str, score: float | None, reason_parts: list[str]
) -> None:
    result = judge(metrics, JudgeConfig())
    assert result.verdict == verdict
    if score is None:
        assert result.score is None
    else:
        assert result.score == pytest.approx(score)
    reasons = "\n".join([*result.reasons, *(m.reason for m in result.metrics)])
    for part in reason_parts:
        assert part in reasons
    json.dumps(result.to_dict(), allow_nan=False)


def test_faster_canary_is_low_but_not_failed() -> None:
    (metric,) = judge([_latency(LINK, FASTER)]).metrics
    assert metric.classification == "low"
    assert not metric.failed
    assert metric.reason.startswith(f"{LINK}: canary median ")
    assert metric.reason.endswith(", Low")


@pytest.mark.parametrize(
    ("direction", "failed"), [("increase", False), ("either", True), ("decrease", True)]
)
def test_direction_decides_whether_low_fails(direction: Direction, failed: bool) -> None:
    metric = MetricSamples(
        LINK,
        "latency",
        _seconds(FASTER),
        _seconds(BASELINE_MS),
        direction=direction,
    )
    (result,) = judge([metric]).metrics
    assert (result.classification, result.failed) == ("low", failed)


def test_small_shift_within_allowed_increase_passes() -> None:
    # +3% is significant with these samples, but under the default allowed_increase of 1.1.
    (metric,) = judge([_latency(LINK, BASELINE_MS * 1.03 + 0.5)]).metrics
    assert metric.mann_whitney is not None and metric.mann_whitney.lower > 0
    assert metric.classification == "pass"
    strict = judge([_latency(LINK, BASELINE_MS * 1.03 + 0.5)], JudgeConfig(allowed_increase=1.0))
    assert strict.metrics[0].classification == "high"


def test_critical_metric_without_data_is_inconclusive() -> None:
    few = MetricSamples("checkout latency", "latency", [0.1], [0.1, 0.2], critical=True)
    result = judge([few, _latency(LINK, SAME)])
    assert result.verdict == "inconclusive"
    assert result.reasons[0].startswith("too few samples for a critical metric: checkout latency")


def test_critical_failure_outranks_missing_critical_data() -> None:
    few = MetricSamples("checkout latency", "latency", [0.1], [0.1, 0.2], critical=True)
    result = judge([few, _latency(LINK, SLOWER, critical=True)])
    assert (result.verdict, result.score) == ("fail", 0.0)


def test_group_weights() -> None:
    metrics = [
        _latency(LINK, SLOWER),  # group "latency" scores 0
        _errors("checkout/create_order errors", 0, 0),  # group "error_ratio" scores 100
    ]
    result = judge(metrics, JudgeConfig(group_weights={"error_ratio": 80.0}))
    assert result.score == pytest.approx(80.0)
    assert result.verdict == "marginal"
    weights = {g.name: g.weight for g in result.groups}
    assert weights == pytest.approx({"latency": 0.2, "error_ratio": 0.8})


def test_to_dict_is_plain_json() -> None:
    # Baseline without errors: the mean ratio is undefined and must come out as null.
    result = judge([_errors("checkout/create_order errors", 6, 0), _latency(LINK, SLOWER)])
    payload = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert payload["verdict"] == "fail"
    errors, latency = payload["metrics"]
    assert errors["effect_size"] is None
    assert latency["mann_whitney"]["estimate"] == pytest.approx(0.114)
    assert payload["thresholds"] == {"pass": 95.0, "marginal": 75.0}
    assert isinstance(result, Verdict) and not result.passed


def test_many_samples_are_thinned_not_refused() -> None:
    rng = np.random.default_rng(7)
    base = rng.lognormal(-2.3, 0.2, size=2500)
    metric = MetricSamples(LINK, "latency", list(base * 1.5), list(base))
    (result,) = judge([metric]).metrics
    assert result.classification == "high"
    assert result.canary.count == 2500 - result.canary.removed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"marginal_threshold": 96.0}, "marginal_threshold 96.0 is above pass_threshold 95.0"),
        ({"group_weights": {"latency": -1.0}}, "group_weights must not be negative: latency"),
        ({"confidence": 1.0}, "less than 1"),
        ({"min_sample": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_config(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JudgeConfig(**kwargs)


def test_error_samples_must_be_observations() -> None:
    with pytest.raises(ValueError, match=r"error_ratio samples must lie in \[0, 1\]"):
        MetricSamples("errors", "error_ratio", [0.0, 2.0], [0.0])


# --- invariants -------------------------------------------------------------------------------

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
whole = st.integers(min_value=-50, max_value=50).map(float)
confidences = st.sampled_from([0.8, 0.9, 0.95, 0.98, 0.99])


@settings(max_examples=150, deadline=None)
@given(
    x=st.lists(finite, min_size=1, max_size=25),
    y=st.lists(finite, min_size=1, max_size=25),
    confidence=confidences,
)
def test_estimate_lies_within_interval(x: list[float], y: list[float], confidence: float) -> None:
    lower, upper, estimate = mann_whitney_ci(x, y, confidence)
    assert lower <= estimate <= upper


@settings(max_examples=150, deadline=None)
@given(
    x=st.lists(whole, min_size=1, max_size=20),
    y=st.lists(whole, min_size=1, max_size=20),
    confidence=confidences,
)
def test_swapping_sides_negates(x: list[float], y: list[float], confidence: float) -> None:
    lower, upper, estimate = mann_whitney_ci(x, y, confidence)
    s_lower, s_upper, s_estimate = mann_whitney_ci(y, x, confidence)
    assert (s_lower, s_upper, s_estimate) == (-upper, -lower, -estimate)


@settings(max_examples=100, deadline=None)
@given(
    x=st.lists(whole, min_size=2, max_size=20),
    y=st.lists(whole, min_size=2, max_size=20),
    shift=st.integers(min_value=-100, max_value=100),
)
def test_shifting_the_canary_shifts_everything(x: list[float], y: list[float], shift: int) -> None:
    base = mann_whitney_ci(x, y, 0.95)
    moved = mann_whitney_ci([v + shift for v in x], y, 0.95)
    assert moved == tuple(v + shift for v in base)


@settings(max_examples=100, deadline=None)
@given(
    x=st.lists(whole, min_size=2, max_size=15),
    y=st.lists(whole, min_size=2, max_size=15),
)
def test_wider_confidence_wider_interval(x: list[float], y: list[float]) -> None:
    narrow = mann_whitney_ci(x, y, 0.8)
    wide = mann_whitney_ci(x, y, 0.99)
    assert wide[0] <= narrow[0] and narrow[1] <= wide[1]
