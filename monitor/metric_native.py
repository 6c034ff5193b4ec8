"""Native (sparse, exponential) histogram buckets, kept beside a HistogramFamily's classic ones
and exposed to scrapers that negotiate Prometheus's protobuf format (monitor/metric_proto.py).

A native histogram is one Prometheus series instead of one per bucket plus `_count` and `_sum`
(16 for the default latency ladder), and its buckets follow the data: bucket `k` of schema `s`
holds the observations in (2^((k-1)/2^s), 2^(k/2^s)], and only the buckets that received one are
kept and sent. Schema 3 (8 buckets per doubling, each 9 % wider than the one before it) bounds a
quantile's error at ±4.4 %, where the classic 1-2.5-5 ladder's widest steps (2.5 times) leave it at
up to ±60 %; the latency of one hop rarely spans more than a few doublings, so a series keeps
a handful to a few dozen buckets. A series that reaches MAX_BUCKETS halves its resolution (as
client_golang's NativeHistogramMaxBucketNumber does), so an unruly one stays bounded.

Zero and negative observations (a clock step) go to the zero bucket and the negative buckets;
NaN counts in the sum only, as in the classic histogram. The zero threshold is never 0:
Prometheus 2.42 takes a histogram without buckets and with a zero threshold of 0 for a classic
one, so a series that has seen nothing yet would otherwise be misread.
"""

from __future__ import annotations

import math
from bisect import bisect_left

SCHEMA = 3
MAX_BUCKETS = 160  # client_golang's recommended NativeHistogramMaxBucketNumber
MIN_SCHEMA = -4
ZERO_THRESHOLD = 2.0**-128  # client_golang's DefNativeHistogramZeroThreshold


def _bounds(schema: int) -> list[float]:
    """The fractions (as math.frexp gives them, in [0.5, 1)) where a doubling's buckets end."""
    return [2.0 ** (i / 2**schema - 1) for i in range(2**schema)] if schema > 0 else []


_BOUNDS = {s: _bounds(s) for s in range(MIN_SCHEMA, 9)}


def bucket_index(value: float, schema: int) -> int:
    """The index of the bucket holding `value` (> 0) at `schema` (client_golang's arithmetic;
    HistogramFamily.observe_at's fast path, ceil(log2(value) * 2^schema), agrees but for
    values within a rounding error of a bound)."""
    frac, exp = math.frexp(value)
    if schema > 0:
        bounds = _BOUNDS[schema]
        return bisect_left(bounds, frac) + (exp - 1) * len(bounds)
    key = exp - 1 if frac == 0.5 else exp
    return (key + (1 << -schema) - 1) >> -schema


def upper_bound(index: int, schema: int) -> float:
    """Bucket `index`'s inclusive upper bound at `schema` (for tests and readers)."""
    bound: float = 2.0 ** (index / 2**schema)
    return bound


class NativeBuckets:
    """The native buckets of every series of one family, by the series' offset: index → count
    per sign, the zero bucket, and the schema of the series that had to halve theirs.

    Plain dicts of ints, which the garbage collector does not track (an object per series
    would be one more tracked object per histogram: tests/test_metrics_compact.py).
    """

    __slots__ = ("negative", "positive", "schemas", "zero")

    def __init__(self) -> None:
        self.positive: dict[int, dict[int, int]] = {}
        self.negative: dict[int, dict[int, int]] = {}
        self.zero: dict[int, int] = {}
        self.schemas: dict[int, int] = {}  # only the series below SCHEMA

    def observe(self, offset: int, value: float) -> None:
        if value > ZERO_THRESHOLD:
            side = self.positive
        elif value < -ZERO_THRESHOLD:
            side, value = self.negative, -value
        else:
            if value == value:  # NaN is in the sum only
                self.zero[offset] = self.zero.get(offset, 0) + 1
            return
        if value == math.inf:
            return  # in the classic +Inf bucket and the count; no native bucket holds it
        buckets = side.get(offset)
        if buckets is None:
            buckets = side[offset] = {}
        key = bucket_index(value, self.schemas.get(offset, SCHEMA))
        buckets[key] = buckets.get(key, 0) + 1
        if len(buckets) > MAX_BUCKETS // 2:
            self.check(offset)

    def check(self, offset: int) -> None:
        """Halve a series' resolution once it holds more than MAX_BUCKETS buckets."""
        if self._size(offset) > MAX_BUCKETS:
            self._halve(offset)

    def schema(self, offset: int) -> int:
        return self.schemas.get(offset, SCHEMA)

    def drop(self, offset: int) -> None:
        for kept in (self.positive, self.negative, self.zero, self.schemas):
            kept.pop(offset, None)

    def _size(self, offset: int) -> int:
        return len(self.positive.get(offset, ())) + len(self.negative.get(offset, ()))

    def _halve(self, offset: int) -> None:
        """One schema lower: buckets 2j-1 and 2j become bucket j."""
        schema = self.schema(offset)
        if schema <= MIN_SCHEMA:
            return
        self.schemas[offset] = schema - 1
        for side in (self.positive, self.negative):
            merged: dict[int, int] = {}
            for key, count in side.get(offset, {}).items():
                merged[(key + 1) >> 1] = merged.get((key + 1) >> 1, 0) + count
            if merged:
                side[offset] = merged


def spans(buckets: dict[int, int]) -> tuple[list[tuple[int, int]], list[int]]:
    """The protobuf form of one sign's buckets: (offset, length) spans and count deltas.

    Gaps of one or two empty buckets are sent as zero counts rather than a new span (a span
    costs more bytes than two zeros), as client_golang does.
    """
    result: list[tuple[int, int]] = []
    deltas: list[int] = []
    previous_key, previous_count = 0, 0
    for key in sorted(buckets):
        count = buckets[key]
        if not result:
            result.append((key, 1))
        else:
            gap = key - previous_key - 1
            if gap <= 2:
                for _ in range(gap):
                    deltas.append(-previous_count)
                    previous_count = 0
                offset, length = result[-1]
                result[-1] = (offset, length + gap + 1)
            else:
                result.append((gap, 1))
        deltas.append(count - previous_count)
        previous_key, previous_count = key, count
    return result, deltas
