"""Which control-topic partition owns each flow, and each channel arrivals come in on.

A flow's key is its name, except that flows waiting on a shared channel (a webhook path, a
Kafka topic) are owned together: their key is the first name, in sorted order, of the flows
connected through shared channels. So every channel has exactly one owner, and an arrival is
offered (and counted) on one replica only. The partition is Kafka's default partitioner on the
key: murmur2 of its UTF-8 bytes, made positive, modulo the partition count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from aiokafka.partitioner import murmur2

from monitor.config import Flow
from probes import KINDS
from probes.arrivals import channel_name


def partition_of(key: str, partitions: int) -> int:
    """Kafka's default partition for a record keyed `key` (the Java client's and aiokafka's)."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def channels_of(flow: Flow) -> set[str]:
    """The channels the flow's waiting steps listen on (as the correlator names them)."""
    found: set[str] = set()
    for step in flow.all_steps():
        spec = KINDS[step.kind]
        if spec.listens is not None:
            found.add(spec.listens(step).path)
        if spec.watches is not None:
            found.add(channel_name(*spec.watches(step)))
    return found


def ownership_keys(flows: Sequence[Flow]) -> dict[str, str]:
    """Flow name → its ownership key (union-find over shared channels)."""
    parent = {f.name: f.name for f in flows}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    first_on: dict[str, str] = {}
    for flow in sorted(flows, key=lambda f: f.name):
        for channel in channels_of(flow):
            other = first_on.setdefault(channel, flow.name)
            a, b = root(other), root(flow.name)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {name: root(name) for name in parent}


def flows_digest(flows: Iterable[Flow]) -> str:
    """A short digest of the flow set: replicas that must agree on it compare these."""
    h = hashlib.sha256()
    for flow in sorted(flows, key=lambda f: f.name):
        h.update(flow.model_dump_json().encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class Ownership:
    """The partition of every flow and channel, for one flow set and partition count."""

    def __init__(self, flows: Sequence[Flow], partitions: int) -> None:
        self.partitions = partitions
        keys = ownership_keys(flows)
        self.of_flow = {f.name: partition_of(keys[f.name], partitions) for f in flows}
        self.of_channel = {
            channel: self.of_flow[f.name] for f in flows for channel in channels_of(f)
        }
        self._flows = list(flows)

    def flows_in(self, partitions: Iterable[int]) -> list[Flow]:
        wanted = set(partitions)
        return [f for f in self._flows if self.of_flow[f.name] in wanted]
