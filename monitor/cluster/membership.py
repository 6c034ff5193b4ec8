"""This replica's membership of the group: owning flows as partitions come and go, and the
control topic's records (arrivals forwarded by other replicas) offered to the correlator.

aiokafka's rebalance is eager: every member's `on_partitions_revoked` finishes before any member
gets partitions, so a flow is stopped (runs in flight aborted, gauges removed) on its old owner
before its new owner starts it. The control topic carries arrivals to the partition that owns
their channel; each owner commits what it offered, so a new owner goes on from there and an
arrival forwarded during a handover is offered once, on the new owner (unmatched there if its
run was aborted), never lost from the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.structs import ConsumerRecord

from monitor.cluster.assignor import FlowAssignor, View
from monitor.cluster.metrics import ClusterMetrics
from monitor.cluster.ownership import Ownership
from monitor.cluster.wire import Refusal, decode_arrival, encode_arrival, encode_refusal
from monitor.config import Flow
from monitor.receivers.webhooks import Inbox
from probes.arrivals import Arrival

log = logging.getLogger(__name__)

CONTROL_FETCH_WAIT_MS = 20

OwnFlows = Callable[[list[Flow]], Awaitable[None]]


class Membership:
    """Joins the group, owns the flows of the partitions assigned, forwards and takes arrivals."""

    def __init__(
        self,
        *,
        client_options: dict[str, Any],
        group: str,
        topic: str,
        replica: str,
        digest: str,
        flows: Sequence[Flow],
        partitions: int,
        session_timeout_s: float,
        own: OwnFlows,
        disown: OwnFlows,
        local: Inbox,
        metrics: ClusterMetrics,
    ) -> None:
        self._options = client_options
        self.group, self.topic, self.replica, self.digest = group, topic, replica, digest
        self._flows = list(flows)
        self._wanted_partitions = partitions
        self._session_ms = int(session_timeout_s * 1000)
        self._own, self._disown, self._local = own, disown, local
        self.metrics = metrics
        metrics.flows.set(len(self._flows))
        self.ownership = Ownership(self._flows, partitions)
        self.assignor = FlowAssignor(replica, digest, topic)
        self.owned: set[int] = set()  # partitions this replica owns now
        self.owned_flows: list[Flow] = []
        self.rebalances = 0
        self.last_rebalance_unix: float | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the control topic if missing, start forwarding, and join the group."""
        await self._ensure_topic()
        self._producer = AIOKafkaProducer(**self._options, linger_ms=0, acks=1)
        await self._producer.start()
        consumer = AIOKafkaConsumer(
            **self._options,
            group_id=self.group,
            partition_assignment_strategy=(self.assignor,),
            enable_auto_commit=False,
            auto_offset_reset="latest",
            session_timeout_ms=self._session_ms,
            # How long the broker may hold a fetch that found nothing. Tansu answers a held
            # fetch when its wait ends, not when a record lands: with aiokafka's 500 ms a
            # forwarded arrival waited 100-250 ms (benchmarks/cluster.py); 20 ms makes it a
            # few ms, for 50 small idle fetches a second per replica. Kafka answers on arrival.
            fetch_max_wait_ms=CONTROL_FETCH_WAIT_MS,
            heartbeat_interval_ms=max(100, self._session_ms // 10),
        )
        consumer.subscribe([self.topic], listener=_Listener(self))
        await consumer.start()
        self._consumer = consumer
        self._poller = asyncio.create_task(self._poll(consumer), name="cluster-control")

    async def stop(self) -> None:
        """Give every flow up (runs aborted), then leave the group so others take over now."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self._revoke()
        if self._consumer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._consumer.stop()  # LeaveGroup: an immediate rebalance
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=2.0)
        if self._producer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._producer.stop()

    async def _ensure_topic(self) -> None:
        admin = AIOKafkaAdminClient(**_admin_options(self._options))
        await admin.start()
        try:
            try:
                await admin.create_topics([NewTopic(self.topic, self._wanted_partitions, 1)])
                log.info("created %s with %d partitions", self.topic, self._wanted_partitions)
            except TopicAlreadyExistsError:
                pass
            meta = await admin.describe_topics([self.topic])
        finally:
            await admin.close()
        found = len(meta[0]["partitions"]) if meta and meta[0].get("partitions") else 0
        if found and found != self._wanted_partitions:
            log.warning(
                "%s has %d partitions (settings ask %d): using %d",
                self.topic, found, self._wanted_partitions, found,
            )  # fmt: skip
            self.ownership = Ownership(self._flows, found)

    # -- rebalances ------------------------------------------------------------------------

    async def _revoke(self) -> None:
        flows, self.owned_flows, self.owned = self.owned_flows, [], set()
        self.metrics.owned_flows.set(0)
        if flows:
            await self._disown(flows)

    async def _assign(self, partitions: set[int]) -> None:
        self.rebalances += 1
        self.last_rebalance_unix = time.time()
        self.metrics.rebalances.inc()
        view = self.assignor.view
        self.metrics.members.set(len(view.members))
        self._check_flow_sets(view)
        self.owned = partitions
        self.owned_flows = self.ownership.flows_in(partitions)
        self.metrics.owned_flows.set(len(self.owned_flows))
        log.info(
            "replica %s owns %d partitions, %d flows (%d members)",
            self.replica, len(partitions), len(self.owned_flows), len(view.members),
        )  # fmt: skip
        if self.owned_flows:
            await self._own(self.owned_flows)

    def _check_flow_sets(self, view: View) -> None:
        others = [m for m in view.members if m.digest != self.digest]
        self.metrics.flow_set_mismatch.set(len(others))
        if others:
            log.warning(
                "replicas load different flows (mine %s): %s — every replica must load the "
                "same flow files, or flows are owned twice or not at all",
                self.digest, ", ".join(f"{m.replica}={m.digest}" for m in others),
            )  # fmt: skip

    # -- arrivals --------------------------------------------------------------------------

    def owns_channel(self, channel: str) -> bool | None:
        """Whether this replica owns the channel now; None for a channel no flow listens on."""
        partition = self.ownership.of_channel.get(channel)
        return None if partition is None else partition in self.owned

    def offer(self, arrival: Arrival) -> str:
        """Where an arrival goes: this replica's correlator when it owns the channel (or no
        flow listens there: counted unmatched here); the owner's partition for a webhook;
        nowhere for a Kafka record another replica owns, since every replica's shared
        consumer reads it and the owner counts it."""
        owned = self.owns_channel(arrival.channel)
        if owned is None or owned:
            return self._local.offer(arrival)
        if arrival.source == "kafka":
            return "elsewhere"
        self.forward(arrival)
        return "forwarded"

    def refused(self, channel: str, why: str, *, signature: bool) -> None:
        """A delivery refused here: told to the replica owning its path, whose waiting step
        then says what broke (a rotated secret is not a dead sender)."""
        if self.owns_channel(channel) is False:
            refusal = encode_refusal(Refusal(channel, why, signature), self.replica)
            self._send_soon(channel, refusal)
        else:
            self._local.refused(channel, why, signature=signature)

    def forward(self, arrival: Arrival) -> None:
        """Send the arrival to the partition owning its channel; never waits for the broker."""
        self._send_soon(arrival.channel, encode_arrival(arrival, self.replica))

    def _send_soon(self, channel: str, record: tuple[bytes, list[tuple[str, bytes]]]) -> None:
        partition = self.ownership.of_channel[channel]
        task = asyncio.create_task(self._send(channel, record, partition))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(
        self, channel: str, record: tuple[bytes, list[tuple[str, bytes]]], partition: int
    ) -> None:
        assert self._producer is not None
        value, headers = record
        try:
            await self._producer.send_and_wait(
                self.topic, value, headers=headers, partition=partition
            )
            self.metrics.forwarded.labels("sent").inc()
        except (KafkaError, OSError) as exc:
            self.metrics.forwarded.labels("failed").inc()
            log.warning("forwarding to the owner of %s failed: %s", channel, exc)

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                log.warning("control topic: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                if tp.partition in self.owned:
                    for record in records:
                        self._take(record)
            if batches:
                # Where the next owner of these partitions starts: after what was offered
                # here, so arrivals forwarded during a handover are offered (and counted) once.
                with contextlib.suppress(KafkaError):
                    await consumer.commit()

    def _take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        taken = decode_arrival(record.value or b"", record.headers)
        if taken is None:
            self.metrics.forwarded.labels("malformed").inc()
        elif isinstance(taken, Refusal):
            self._local.refused(taken.channel, taken.why, signature=taken.signature)
        else:
            self.metrics.forward_delay.observe(max(0.0, time.time() - taken.received_unix))
            self._local.offer(taken)

    # -- what the API shows ----------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        view = self.assignor.view
        of_partition: dict[int, list[str]] = {}
        for name, partition in self.ownership.of_flow.items():
            of_partition.setdefault(partition, []).append(name)
        return {
            "group": self.group,
            "topic": self.topic,
            "replica": self.replica,
            "generation": self.generation(),
            "rebalances": self.rebalances,
            "last_rebalance_unix": self.last_rebalance_unix,
            "partitions": self.ownership.partitions,
            "flow_set_digest": self.digest,
            "members": [
                {
                    "replica": m.replica,
                    "flow_set_digest": m.digest,
                    "partitions": list(m.partitions),
                    "flows": sorted(f for p in m.partitions for f in of_partition.get(p, [])),
                }
                for m in view.members
            ],
        }

    def generation(self) -> int | None:
        # aiokafka keeps the generation on its coordinator, which it does not make public.
        coordinator = getattr(self._consumer, "_coordinator", None)
        generation = getattr(coordinator, "generation", None)
        return generation if isinstance(generation, int) and generation >= 0 else None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.membership._revoke()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.membership._assign({tp.partition for tp in assigned})


def _admin_options(options: dict[str, Any]) -> dict[str, Any]:
    """The client options an admin client takes (it has no client_id-less defaults to keep)."""
    keep = (
        "bootstrap_servers", "client_id", "security_protocol", "request_timeout_ms",
        "ssl_context", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    )  # fmt: skip
    return {k: v for k, v in options.items() if k in keep}
