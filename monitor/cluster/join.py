"""Building this replica's Membership from the cluster settings and the flow files' Kafka."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry

from monitor.cluster.membership import Membership, OwnFlows
from monitor.cluster.metrics import ClusterMetrics
from monitor.cluster.ownership import flows_digest
from monitor.cluster.settings import ClusterSettings
from monitor.config import Flow
from monitor.kafka.cluster import Cluster, ClusterHealth
from monitor.kafka.settings import KafkaCluster
from monitor.receivers.webhooks import Inbox
from probes.errors import ConfigError


def membership_for(
    settings: ClusterSettings,
    clusters: Mapping[str, KafkaCluster],
    flows: Sequence[Flow],
    *,
    own: OwnFlows,
    disown: OwnFlows,
    local: Inbox,
    registry: CollectorRegistry,
) -> Membership:
    if settings.kafka is not None:
        if settings.kafka not in clusters:
            known = ", ".join(sorted(clusters)) or "none"
            raise ConfigError(
                [f"settings.cluster.kafka: {settings.kafka!r} is not in kafka.clusters "
                 f"(known: {known})"]
            )  # fmt: skip
        config = clusters[settings.kafka]
    else:
        assert settings.bootstrap_servers is not None  # the model allows one or the other
        config = KafkaCluster(bootstrap_servers=settings.bootstrap_servers)
    name = settings.kafka or "cluster"
    kafka = Cluster(name, config, ClusterHealth(name, ()))
    return Membership(
        client_options=kafka.client_options(),
        group=settings.group,
        topic=settings.control_topic(),
        replica=settings.replica_name(),
        digest=flows_digest(flows),
        flows=flows,
        partitions=settings.partitions,
        session_timeout_s=settings.session_timeout,
        own=own,
        disown=disown,
        local=local,
        metrics=ClusterMetrics(registry),
    )
