"""The cluster's own metrics: members, owned flows, rebalances, forwarded arrivals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# What a replica exports besides monitor.metrics.METRIC_NAMES (name as scraped: its type), for
# the dashboards' and rules' checks.
CLUSTER_METRIC_NAMES: dict[str, str] = {
    "hopwatch_cluster_members": "gauge",
    "hopwatch_cluster_flows": "gauge",
    "hopwatch_cluster_owned_flows": "gauge",
    "hopwatch_cluster_rebalances_total": "counter",
    "hopwatch_cluster_flow_set_mismatch": "gauge",
    "hopwatch_cluster_forwarded_arrivals_total": "counter",
    "hopwatch_cluster_forward_delay_seconds": "histogram",
}
FORWARD_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ClusterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.members = Gauge(
            "hopwatch_cluster_members", "Replicas in the group as of the last rebalance.",
            registry=registry,
        )  # fmt: skip
        self.flows = Gauge(
            "hopwatch_cluster_flows", "Flows this replica's files configure (all replicas').",
            registry=registry,
        )  # fmt: skip
        self.owned_flows = Gauge(
            "hopwatch_cluster_owned_flows", "Flows this replica schedules now.", registry=registry
        )
        self.rebalances = Counter(
            "hopwatch_cluster_rebalances", "Rebalances this replica took part in.",
            registry=registry,
        )  # fmt: skip
        self.flow_set_mismatch = Gauge(
            "hopwatch_cluster_flow_set_mismatch",
            "Members whose flow set differs from this replica's (should be 0).",
            registry=registry,
        )
        self.forwarded = Counter(
            "hopwatch_cluster_forwarded_arrivals",
            "Arrivals sent to (sent, failed) or taken from (malformed) the control topic.",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.forward_delay = Histogram(
            "hopwatch_cluster_forward_delay_seconds",
            "From an arrival reaching one replica to its owner offering it.",
            registry=registry, buckets=FORWARD_BUCKETS,
        )  # fmt: skip
