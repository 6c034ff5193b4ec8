"""The group's partition assignor: balanced ranges of the control topic, and the cluster's view.

Kafka's group protocol lets each member send bytes with its join (here: its replica name and
flow-set digest) and lets the elected leader send bytes back with each assignment (here: who
owns what). So every replica learns the whole membership from the broker it already talks to,
with no coordinator of our own. The leader's plan is deterministic: members sorted by replica
name, each given a contiguous range of partitions, the first few one more.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

VERSION = 0


@dataclass(frozen=True, slots=True)
class Member:
    """One replica as the group's leader saw it in the last rebalance."""

    replica: str
    digest: str
    partitions: tuple[int, ...]


@dataclass(slots=True)
class View:
    """The cluster as of this replica's last assignment."""

    members: list[Member] = field(default_factory=list)

    def digests(self) -> set[str]:
        return {m.digest for m in self.members}


def plan(replicas: list[str], partitions: list[int]) -> list[list[int]]:
    """Contiguous, balanced ranges of `partitions` for the sorted `replicas`."""
    share, extra = divmod(len(partitions), len(replicas))
    out, start = [], 0
    for i in range(len(replicas)):
        size = share + (1 if i < extra else 0)
        out.append(partitions[start : start + size])
        start += size
    return out


class FlowAssignor:
    """An aiokafka partition assignor (the protocol's `name`, `metadata`, `assign`,
    `on_assignment`), one instance per replica since it carries the replica's own name."""

    name = "hopwatch-flows"
    version = VERSION

    def __init__(self, replica: str, digest: str, topic: str) -> None:
        self.replica = replica
        self.digest = digest
        self.topic = topic
        self.view = View()

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        me = json.dumps({"replica": self.replica, "digest": self.digest}).encode()
        return ConsumerProtocolMemberMetadata(VERSION, list(topics), me)

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        seen = {member_id: _decode(meta.user_data) for member_id, meta in members.items()}
        order = sorted(members, key=lambda m: (str(seen[m].get("replica", "")), m))
        partitions = sorted(cluster.partitions_for_topic(self.topic) or ())
        ranges = plan(order, partitions)
        view = [
            {
                "replica": str(seen[m].get("replica", m)),
                "digest": str(seen[m].get("digest", "")),
                "partitions": ranges[i],
            }
            for i, m in enumerate(order)
        ]
        everyone = json.dumps({"members": view}).encode()
        return {
            m: ConsumerProtocolMemberAssignment(VERSION, [(self.topic, ranges[i])], everyone)
            for i, m in enumerate(order)
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        members = _decode(assignment.user_data).get("members", [])
        self.view = View(
            [
                Member(str(m["replica"]), str(m["digest"]), tuple(int(p) for p in m["partitions"]))
                for m in members
            ]
        )


def _decode(data: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
