"""The group's partition assignor: balanced ranges of the control topic, and the cluster's view.

Kafka's group protocol lets each member send bytes with its join (here: its replica name and
flow-set digest) and lets the elected leader send bytes back with each assignment (here: who
owns what). So every replica learns the whole membership from the broker it already talks to,
with no coordinator of our own. The leader's plan is deterministic and sticky: each member
keeps what it had (up to its fair share), and what is left is dealt out in order; with no
history (a new group) that is a contiguous range per member, sorted by replica name. Sticky,
because a partition that moves hands its flows' incidents and schedule to another replica.
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

from probes import untrusted_json

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


def plan(
    replicas: list[str], partitions: list[int], had: Mapping[str, Iterable[int]] | None = None
) -> list[list[int]]:
    """Balanced shares of `partitions` for `replicas` (in order): each keeps what it `had` up
    to its share (those that had most get the larger shares), the rest dealt in order."""
    had = had or {}
    share, extra = divmod(len(partitions), len(replicas))
    by_history = sorted(range(len(replicas)), key=lambda i: -len(list(had.get(replicas[i], ()))))
    quota = [share] * len(replicas)
    for i in by_history[:extra]:
        quota[i] += 1
    valid, taken = set(partitions), set()
    out: list[list[int]] = [[] for _ in replicas]
    for i, replica in enumerate(replicas):
        for p in sorted(had.get(replica, ())):
            if p in valid and p not in taken and len(out[i]) < quota[i]:
                out[i].append(p)
                taken.add(p)
    free = iter(p for p in partitions if p not in taken)
    for i in range(len(replicas)):
        while len(out[i]) < quota[i]:
            out[i].append(next(free))
    return [sorted(part) for part in out]


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
        self.had: tuple[int, ...] = ()  # this member's partitions in the last assignment

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        me = json.dumps(
            {"replica": self.replica, "digest": self.digest, "had": list(self.had)}
        ).encode()
        return ConsumerProtocolMemberMetadata(VERSION, list(topics), me)

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        seen = {member_id: _decode(meta.user_data) for member_id, meta in members.items()}
        order = sorted(members, key=lambda m: (str(seen[m].get("replica", "")), m))
        partitions = sorted(cluster.partitions_for_topic(self.topic) or ())
        had = {m: [int(p) for p in seen[m].get("had", ())] for m in order}
        ranges = plan(order, partitions, had)
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
        self.had = tuple(sorted(tp.partition for tp in assignment.partitions()))
        members = _decode(assignment.user_data).get("members", [])
        self.view = View(
            [
                Member(str(m["replica"]), str(m["digest"]), tuple(int(p) for p in m["partitions"]))
                for m in members
            ]
        )


def _decode(data: bytes | None) -> dict[str, Any]:
    try:
        value = untrusted_json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
