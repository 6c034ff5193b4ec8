"""The `settings.metrics` section of a flow file: what /metrics exports beyond what the boards and
alerts need, since every series is paid for by the Prometheus that scrapes it."""

from __future__ import annotations

from itertools import pairwise

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A 1-2.5-5 ladder from 1 ms to 10 s, then 30 s (a run's default timeout): 15 buckets with +Inf.
# It also had 75 ms, 750 ms, 7.5 s and 60 s until 2026-12: dropping them took 4 of every hop's
# 21 series; the `le` values kept are the same, so recorded data and rules (le="5") go on.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
SLO_BOUND = 5.0  # deploy/prometheus/rules/recording.yml reads le="5" of the run duration


class MetricsSettings(BaseModel):
    """Optional series: each one a Prometheus pays for in memory and scrape time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    http_phases: bool = Field(
        default=False,
        description="Export hopwatch_http_phase_duration_seconds (DNS, connect, TLS, processing, "
        "transfer: a histogram per phase and HTTP hop) for every flow; a flow's own "
        "`http_phases` overrides it; default false (runs, traces and the API keep the phases).",
    )
    created_series: bool = Field(
        default=False,
        description="Export the `_created` sample of every counter and histogram (one series "
        "each, which Prometheus 2 stores as a series of its own); default false.",
    )
    native_histograms: bool = Field(
        default=True,
        description="Keep native (sparse, exponential) buckets for the run, hop and HTTP phase "
        "latency histograms and send them to scrapers that negotiate Prometheus's protobuf "
        "format (one series per histogram instead of one per bucket); text and OpenMetrics "
        "scrapes get the classic buckets either way; default true.",
    )
    classic_with_native: bool = Field(
        default=False,
        description="Send the classic buckets beside the native ones in a protobuf scrape, for "
        "a Prometheus that keeps both (2.45+: scrape_classic_histograms) while its rules move "
        "over; default false (Prometheus 2.42 ignores them anyway).",
    )
    latency_buckets: tuple[float, ...] = Field(
        default=LATENCY_BUCKETS,
        min_length=1,
        description="Upper bounds (seconds) of the run and hop latency histograms, +Inf added; "
        "must include 5 (the latency SLO's bound); default 1ms, 2.5ms, 5ms … 5s, 10s, 30s "
        "(14 bounds).",
    )

    @field_validator("latency_buckets")
    @classmethod
    def _sorted_with_slo(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(b <= a for a, b in pairwise(value)) or value[0] <= 0:
            raise ValueError("latency_buckets must be positive and strictly increasing")
        if SLO_BOUND not in value:
            raise ValueError("latency_buckets must include 5 (the latency SLO's bound)")
        return value
