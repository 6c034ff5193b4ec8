"""The demo's event side: the shop publishes orders to Kafka; a worker fulfils them and calls back.

shop API ──► topic `orders` ──► worker ──► PATCH /orders/{id} (fulfilled) ──► row in its table
                                                                          ──► signed webhook
topic `order-commands` ──► worker ──► POST /orders (then the same chain)

Faults (in `Faults.extra`): `worker_stopped` (the worker consumes nothing), `worker_delay_ms`
(a slow consumer), `table_drop` (the order's row is not written). The broker itself is stopped
and started by the demo runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from sqlalchemy.exc import SQLAlchemyError

from monitor.demo.orders_table import OrdersTable
from monitor.demo.shop import Faults
from monitor.demo.telemetry import KafkaHeaders, Telemetry
from monitor.demo.webhooks import WebhookSender
from monitor.kafka.consumer import logs_gone_back
from probes import untrusted_json

log = logging.getLogger(__name__)

ORDERS_TOPIC = "orders"
COMMANDS_TOPIC = "order-commands"
LOG_CHECK_S = 2.0  # how often the worker checks that the broker's logs did not start over
STOP_WITHIN_S = 5.0  # a consumer that cannot leave its group in time is dropped, not waited on


async def ensure_topics(bootstrap: str, partitions: int = 3) -> None:
    """Create the demo's topics, as a deployment would, so the worker's group is assigned their
    partitions at once (instead of after a metadata refresh and a second rebalance)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), 5)
        topics = [NewTopic(t, partitions, 1) for t in (ORDERS_TOPIC, COMMANDS_TOPIC)]
        await asyncio.wait_for(admin.create_topics(topics), 5)  # existing ones: error code 36
    except (KafkaError, OSError, TimeoutError) as exc:
        log.info("demo topics not created (%s); the broker will create them on first use", exc)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


class OrderPublisher:
    """The shop's outbox: publishes each new order to `orders` without making the API wait."""

    def __init__(
        self, bootstrap: str, inject: Callable[[KafkaHeaders], object] | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self.inject = inject
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def hook(self, order: dict[str, Any], request: web.Request) -> None:
        headers: KafkaHeaders = []
        if self.inject is not None:
            self.inject(headers)
        marker = request.headers.get("X-Hopwatch-Run")
        if marker:
            headers.append(("X-Hopwatch-Run", marker.encode()))
        task = asyncio.create_task(self._publish(order, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, order: dict[str, Any], headers: KafkaHeaders) -> None:
        event = {k: order[k] for k in ("id", "sku", "ref", "callback_url")}
        event["order_id"] = event.pop("id")
        producer: AIOKafkaProducer | None = None
        try:
            producer = await self._ensure()
            await asyncio.wait_for(
                producer.send_and_wait(
                    ORDERS_TOPIC, json.dumps(event).encode(), key=event["order_id"].encode(),
                    headers=headers,
                ),
                5,
            )  # fmt: skip
        except (KafkaError, TimeoutError, OSError) as exc:
            log.warning("could not publish order %s: %s", event["order_id"], exc)
            await self._reset(producer)

    async def _ensure(self) -> AIOKafkaProducer:
        async with self._starting:  # one producer for all: concurrent orders made one each
            return await self._start_once()

    async def _start_once(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, request_timeout_ms=5000, acks="all"
            )
            try:
                await asyncio.wait_for(producer.start(), 5)
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _reset(self, failed: AIOKafkaProducer | None = None) -> None:
        """Drop the producer that `failed` (the current one if None), not a newer one."""
        if failed is not None and failed is not self._producer:
            return
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._reset()


class Worker:
    """Consumes orders and commands; heals by itself when the broker comes back."""

    def __init__(
        self,
        bootstrap: str,
        shop_url: str,
        sender: WebhookSender,
        faults: Faults,
        telemetry: Telemetry | None = None,
        table: OrdersTable | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.table = table
        self.shop_url = shop_url
        self.sender = sender
        self.faults = faults
        self.telemetry = telemetry or Telemetry.from_env("shop-worker", exporters=())
        self.processed = 0
        self.joined = asyncio.Event()  # set once the consumer has joined its group
        self.lost = 0  # consumers given up on (broker gone), each replaced by a new one
        self.log_checks = 0  # checks that the broker's logs did not start over
        self.log_restarts = 0  # ... that found they had
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # consumers still leaving their group
        self._http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5),
            trace_configs=[self.telemetry.client_trace_config()],
        )
        self._task = asyncio.create_task(self._supervise(), name="demo-worker")

    async def _supervise(self) -> None:
        if self.table is not None:
            await self.table.prepare()
        while True:
            await ensure_topics(self.bootstrap)
            consumer = AIOKafkaConsumer(
                ORDERS_TOPIC,
                COMMANDS_TOPIC,
                bootstrap_servers=self.bootstrap,
                group_id="demo-worker",
                auto_offset_reset="earliest",  # a new group: take orders placed while joining
                metadata_max_age_ms=2000,
                # Committed after each batch (below): aiokafka's auto-commit makes `stop()` retry
                # its last commit until the group's coordinator answers, which a broker back with
                # empty storage never does, so the worker hung there and never healed.
                enable_auto_commit=False,
            )
            try:
                # Joining a group waits for the rebalance; aiokafka's request timeout covers it.
                await asyncio.wait_for(consumer.start(), 60)
                self.joined.set()
                await self._consume(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker gone: start over when it is back
                self.lost += 1
                log.info("demo worker lost the broker (%s); retrying", exc)
            finally:
                await self._drop(consumer)
            await asyncio.sleep(1.0)

    async def _drop(self, consumer: AIOKafkaConsumer) -> None:
        """Stop `consumer`, waiting at most STOP_WITHIN_S: aiokafka's `stop()` can wait forever
        on a group coordinator that is gone and ignores being cancelled (`wait_for` hung with
        it), so a stop that takes longer goes on alone while a new consumer starts."""
        stopping = asyncio.create_task(consumer.stop(), name="demo-worker-stop")
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
        stopping.add_done_callback(_quiet)
        await asyncio.wait({stopping}, timeout=STOP_WITHIN_S)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        next_check = time.monotonic() + LOG_CHECK_S
        while True:
            if self.faults.extra.get("worker_stopped"):
                await asyncio.sleep(0.2)
                continue
            if time.monotonic() >= next_check:
                await self._reread_if_log_restarted(consumer)
                next_check = time.monotonic() + LOG_CHECK_S
            batches = await consumer.getmany(timeout_ms=500, max_records=50)
            for partition, records in batches.items():
                if self.faults.extra.get("worker_stopped"):  # stopped while fetching
                    consumer.seek(partition, records[0].offset)  # handle them when resumed
                    continue
                for record in records:
                    await self._handle(record)
            if batches:
                async with asyncio.timeout(5):  # a broker away: _supervise starts over
                    await consumer.commit()

    async def _reread_if_log_restarted(self, consumer: AIOKafkaConsumer) -> None:
        """A broker back with empty storage starts each log at 0 again, and no fetch error says
        so: the consumer would wait for its old offset, ignoring every new order until the log
        got that far (minutes of lost fulfilments). The monitor's own test of it, so a batch
        of records is not taken for a restart (which fulfilled every order again)."""
        async with asyncio.timeout(5):  # a broker away: _supervise starts over
            restarted = list(await logs_gone_back(consumer, fresh_s=2.0))
        self.log_checks += 1
        if restarted:
            self.log_restarts += 1
            log.warning("demo worker: the broker's log restarted; reading it from the start")
            await consumer.seek_to_beginning(*restarted)

    async def _handle(self, record: Any) -> None:
        delay = float(self.faults.extra.get("worker_delay_ms") or 0)
        if delay:
            await asyncio.sleep(delay / 1000)
        try:
            event = untrusted_json.loads(record.value or b"")
        except untrusted_json.NotJson:
            log.warning("demo worker: record at %s is not JSON", record.offset)
            return
        headers = list(record.headers or [])
        marker = dict(headers).get("X-Hopwatch-Run", b"").decode()
        forward = {"X-Hopwatch-Run": marker} if marker else {}
        span = self.telemetry.consumer_span(
            record.topic, headers, partition=record.partition, offset=record.offset,
            key=record.key, group="demo-worker",
        )  # fmt: skip
        with span:
            try:
                if record.topic == COMMANDS_TOPIC:
                    await self._create(event, forward)
                else:
                    await self._fulfil(event, forward)
                self.processed += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("demo worker could not process %s: %s", record.topic, exc)

    async def _create(self, command: dict[str, Any], headers: dict[str, str]) -> None:
        assert self._http is not None
        body = {k: command.get(k) for k in ("sku", "ref", "callback_url")}
        async with self._http.post(f"{self.shop_url}/orders", json=body, headers=headers) as resp:
            resp.raise_for_status()

    async def _fulfil(self, event: dict[str, Any], headers: dict[str, str]) -> None:
        assert self._http is not None
        order_id = event["order_id"]
        url = f"{self.shop_url}/orders/{order_id}"
        async with self._http.patch(url, json={"status": "fulfilled"}, headers=headers) as resp:
            if resp.status == 404:
                return  # deleted by the probe's cleanup before we got to it
            resp.raise_for_status()
        await self._land(event, headers.get("X-Hopwatch-Run", ""))
        self.sender.send(
            {"type": "order.fulfilled", "order_id": order_id, "ref": event.get("ref"),
             "status": "fulfilled"},
            url=event.get("callback_url"),
        )  # fmt: skip

    async def _land(self, event: dict[str, Any], marker: str) -> None:
        """The order's row, written before the webhook says it is fulfilled; a failing
        database is logged, and the webhook still goes (the row is the link that breaks)."""
        if self.table is None or self.faults.extra.get("table_drop"):
            return
        order_id = str(event["order_id"])
        try:
            await self.table.record(order_id, event.get("ref"), event.get("sku"), marker)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("demo worker could not write order %s: %s", order_id, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for stopping in list(self._stopping):
            stopping.cancel()
        if self._http is not None:
            await self._http.close()


def _quiet(task: asyncio.Task[None]) -> None:
    """Retrieve a background stop's error (a broker gone), so asyncio does not log it."""
    if not task.cancelled():
        task.exception()
