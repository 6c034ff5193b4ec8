"""Assembles the monitor from a Config: resources, runner, scheduler, sinks and the two listeners.

`hopwatch run`, `check`, `demo` and the tests all build an Engine; it owns every long-lived
resource (HTTP pools, Kafka clients, the correlator, sinks) and closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from monitor.admin import build_admin_app, is_loopback
from monitor.cluster.settings import ClusterSettings
from monitor.config import Config, Flow
from monitor.correlator import Correlator
from monitor.gate.routes import install_gate_routes
from monitor.gc_settle import settle_after_first_round, settle_start
from monitor.http_clients import HttpClientPool
from monitor.listen import serve_app, split_hostport
from monitor.maintenance import MaintenanceBook
from monitor.metric_types import set_created_series
from monitor.metrics import Metrics, MetricsSink, SharedReadings, watch_event_loop
from monitor.receivers.guard import public_runner
from monitor.receivers.webhooks import (
    Inbox,
    WebhookPaths,
    install_webhook_routes,
    routes_from_steps,
)
from monitor.rejects import RejectLog
from monitor.reload import FlowChanges, Reloader, ReloadMetrics
from monitor.results import RunResult
from monitor.runner import Runner, RunnerDeps
from monitor.scheduler import Scheduler
from monitor.sinks import FanOut, Sink
from monitor.state import LastRuns
from monitor.templates import Templates
from monitor.tracing import Tracing
from probes import KINDS
from probes.arrivals import Arrival

if TYPE_CHECKING:
    from monitor.cluster.membership import Membership
    from monitor.kafka.clients import KafkaClients
    from monitor.store import Store

log = logging.getLogger(__name__)


@dataclass
class Options:
    """Command-line settings that override the flow files' `settings`."""

    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9464"
    public_url: str | None = None
    location: str | None = None
    admin_token: str | None = None
    store_url: str | None = None
    grace: float = 10.0
    settle_gc: bool = False  # freeze start-up objects out of the GC (long-running processes)
    extra_sinks: list[Sink] = field(default_factory=list)
    cluster: ClusterSettings | None = None  # share the flows with other replicas (`run` only)
    config_paths: list[Path] = field(default_factory=list)  # read again on a reload
    watch: bool = False  # reload when the flow files change on disk


class Engine:
    def __init__(
        self,
        config: Config,
        options: Options | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.options = options or Options()
        self.steps = [s for f in config.flows for s in f.all_steps()]  # the config is frozen
        self.registry = registry if registry is not None else CollectorRegistry()
        wanted = config.settings.metrics
        set_created_series(wanted.created_series)  # the process's switch, read at each scrape
        self.metrics = Metrics(
            self.registry,
            wanted.latency_buckets,
            native=wanted.native_histograms,
            classic_with_native=wanted.classic_with_native,
        )
        self.templates = Templates()
        self.http = HttpClientPool()
        self.last_runs = LastRuns(expected=sum(len(f.variants) for f in config.flows))
        self.location = self.options.location or config.settings.location
        self.tracing = Tracing.from_env(location=self.location)
        self.metrics_sink = MetricsSink(self.metrics, http_phases=wanted.http_phases)
        self.metrics_sink.init_series(config.flows, self.location)
        self.sinks = FanOut(
            [self.metrics_sink, self.last_runs, *self.options.extra_sinks],
            self.metrics.sink_errors,
        )
        self.correlator = Correlator(self.metrics.arrivals)
        # the flow files' windows now; the store's (runtime ones) once it is open
        self.maintenance = MaintenanceBook(config.maintenance, registry=self.registry)
        self.inbox: Inbox = self.correlator  # where arrivals go; in a cluster, the membership
        self.membership: Membership | None = None
        self.rejects = RejectLog(self.metrics.arrivals)  # the public listener's refusals
        self.webhook_paths: WebhookPaths | None = None
        self.reloader: Reloader | None = None
        if self.options.config_paths:
            metrics = ReloadMetrics(self.registry)
            self.reloader = Reloader(self.options.config_paths, config, self.apply, metrics)
        cluster = self.options.cluster
        self.kafka: KafkaClients | None = None
        self.store: Store | None = None
        self.scheduler: Scheduler | None = None
        self._runners: list[web.AppRunner] = []
        self._background: list[asyncio.Task[Any]] = []
        self._ready = False
        # set once the collector settled after the first round (for tests and benchmarks)
        self.gc_settled = asyncio.Event()
        public_url = self.options.public_url or f"http://{self.options.listen}"
        self.runner = Runner(
            RunnerDeps(
                templates=self.templates,
                http=self.http,
                sinks=self.sinks,
                location=self.location,
                marker_header=config.settings.marker_header,
                public_url=public_url.rstrip("/"),
                release_run=self.http.release_run,
                correlator=self.correlator,
                tracing=self.tracing,
                replica=cluster.replica_name() if cluster is not None else None,
                in_maintenance=self.maintenance.covers,
            )
        )
        self.registry.register(SharedReadings(self.runner.deps.shared))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, *, schedule: bool = True, admin: bool = True) -> None:
        """Start sinks, receivers and listeners; then the scheduler (unless only checking)."""
        cluster = self.options.cluster if schedule else None
        if cluster is not None:
            self._check_cluster_store()
        await self._start_optional_parts()
        if schedule and self.config.settings.events is not None:
            self._add_events_sink()
        if cluster is not None:
            self._prepare_membership(cluster)
        await self.sinks.start()
        self.http.prepare(set(KINDS.asked(self.steps, lambda kind: kind.tls)))
        self._make_shared()
        self._background.append(asyncio.create_task(watch_event_loop(self.metrics)))
        self._background.append(asyncio.create_task(self.correlator.janitor()))
        self.maintenance.store = self.store
        if self.store is not None:  # the runtime windows before the first runs, if it answers
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.maintenance.sync()
        keeping = self.maintenance.keep(self.maintenance_pairs)
        self._background.append(asyncio.create_task(keeping))
        if self.needs_public_listener():
            await self._serve_public()
        if admin:
            await self._serve(self.build_admin_app(), self.options.admin_listen)
        if schedule:
            self.scheduler = Scheduler(
                [] if cluster is not None else self.config.flows,  # a cluster hands flows out
                self.runner,
                max_concurrency=self.config.settings.max_concurrency,
                metrics=self.metrics,
            )
        if self.options.settle_gc:
            settle_start()  # before the first runs are planned
            if self.scheduler is not None:
                # every first run starts within its interval and ends within its timeout
                cap = max((f.interval + f.timeout for f in self.config.flows), default=0.0)
                every_ran = self.last_runs.complete
                settling = settle_after_first_round(every_ran, cap, self.gc_settled)
                self._background.append(asyncio.create_task(settling))
        if self.scheduler is not None:
            self.scheduler.start()
        if self.membership is not None:
            await self.membership.start()
        if self.reloader is not None and self.options.watch:
            self._background.append(asyncio.create_task(self.reloader.watch()))
        self._ready = True

    async def _serve_public(self) -> None:
        runner = public_runner(
            self.build_public_app(),
            self.rejects,
            header_timeout=self.config.settings.webhook_header_timeout,
        )
        await runner.setup()
        self._runners.append(runner)
        host, port = split_hostport(self.options.listen)
        await web.TCPSite(runner, host, port).start()

    async def _start_optional_parts(self, *, watch: bool = True) -> None:
        """Kafka clients (with their shared consumers) and the store, when asked for."""
        if self.options.store_url:
            from monitor.store import Store  # SQLAlchemy and Alembic: only when storing
            from monitor.store.incidents import policy_of

            self.store = Store(
                self.options.store_url, registry=self.registry, incidents=policy_of(self.config)
            )
            await self.store.migrate()
            self.sinks.add(self.store)
        if self.config.kafka.clusters:
            from monitor.kafka.clients import KafkaClients  # aiokafka: only with clusters

            self.kafka = KafkaClients(
                self.config.kafka.clusters,
                on_arrival=self._offer,
                arrivals_counter=self.metrics.arrivals,
            )
            # In a cluster a replica reads only the topics of the flows it owns (take_flows).
            for cluster, topic in KINDS.asked(
                self.steps if watch else [], lambda kind: kind.watches
            ):
                self.kafka.watch(cluster, topic)
            self.runner.deps.kafka = self.kafka
            await self.kafka.start()
            # Shared consumers read from the end: let them reach it before the first run
            # produces, so nothing is missed. A broker that is down does not hold us up long.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self.kafka.wait_consumer()

    def _make_shared(self) -> None:
        """The long-lived resources of the kinds the flows use (KindSpec.shared), once each."""
        shared = self.runner.deps.shared
        for spec in {KINDS[step.kind].name: KINDS[step.kind] for step in self.steps}.values():
            if spec.shared is not None and spec.name not in shared:
                shared[spec.name] = spec.shared()

    async def _close_shared(self) -> None:
        shared = self.runner.deps.shared
        for name, resources in reversed(list(shared.items())):
            try:
                await resources.aclose()
            except Exception:
                log.exception("closing the %s kind's shared resources failed", name)
        shared.clear()

    async def stop(self) -> None:
        self._ready = False
        if self.membership is not None:
            await self.membership.stop()  # flows given up, group left: others take over now
        if self.scheduler is not None:
            await self.scheduler.stop(self.options.grace)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.sinks.close()
        await self._close_shared()
        await self.http.close()
        if self.kafka is not None:
            await self.kafka.close()
        if self.tracing is not None:
            await self.tracing.aclose()

    def hurry(self) -> None:
        """Cut the shutdown grace short (a second SIGTERM): in-flight runs end as aborted now,
        and are recorded like any other before the sinks close."""
        if self.scheduler is not None:
            self.scheduler.hurry()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- reload ----------------------------------------------------------------------------

    async def _reload_handler(self, _: web.Request) -> web.Response:
        """`POST /-/reload`, as Prometheus answers it: 200 when applied, 500 with why not."""
        assert self.reloader is not None
        ok, message = await self.reloader.reload()
        return web.Response(status=200 if ok else 500, text=message + "\n")

    async def apply(self, new: Config, changes: FlowChanges) -> None:
        """Run `new` from now on: stop what went or changed, start what came or changed; the
        rest keeps its schedule, runs in flight and waiting expectations. In a cluster the
        new flow set means new ownership: the replica leaves the group and joins again."""
        cluster = self.membership is not None
        if self.membership is not None:
            await self.membership.stop()
        elif self.scheduler is not None:
            await self.scheduler.remove([f.name for f in changes.stopping])
        removed = [f.name for f in changes.removed]
        self.metrics_sink.forget(removed, every_series=True)
        self.metrics_sink.forget([f.name for f in changes.stopping])
        for key in [k for k in self.last_runs if k[0] in removed]:
            del self.last_runs[key]
        self.config = new
        self.maintenance.set_declared(new.maintenance)
        if self.store is not None:  # the incident rules and links of the new flow files
            from monitor.store.incidents import policy_of

            self.store.book.policy = policy_of(new)
            # Open incidents of links gone (a flow, a variant or a step) close as at a start.
            # In a cluster the owners take their changed flows again on joining; removed
            # flows nobody takes, so each replica closes them (each writes the same close).
            await self.store.close_unconfigured(
                removed if cluster else [f.name for f in changes.stopping]
            )
        self.steps = [s for f in new.flows for s in f.all_steps()]
        self.last_runs.expected = sum(len(f.variants) for f in new.flows)
        self.metrics_sink.init_series(changes.starting, self.location)
        self.http.prepare(set(KINDS.asked(self.steps, lambda kind: kind.tls)))
        if self.kafka is not None:
            await self.kafka.rewatch(KINDS.asked(self.steps, lambda kind: kind.watches))
        if self.webhook_paths is not None:
            self.webhook_paths.set_routes(routes_from_steps(self.steps))
        elif self.needs_public_listener():
            await self._serve_public()
        if cluster and self.options.cluster is not None:
            self._prepare_membership(self.options.cluster)
            assert self.membership is not None
            await self.membership.start()
        elif self.scheduler is not None:
            self.scheduler.add(changes.starting)

    def maintenance_pairs(self) -> list[tuple[str, str, str]]:
        """(flow, variant, location) of every configured run, for `hopwatch_maintenance`."""
        return [
            (flow.name, variant, flow.location or self.location)
            for flow in self.config.flows
            for variant in flow.variants
        ]

    # -- the cluster -----------------------------------------------------------------------

    def _offer(self, arrival: Arrival) -> str:
        return self.inbox.offer(arrival)

    def _check_cluster_store(self) -> None:
        url = self.options.store_url
        if not (url or "").startswith("postgresql"):
            raise ValueError(
                f"a cluster needs a shared store, not {url or 'none'!r}: give --store "
                "postgresql+asyncpg://USER@HOST/DB (SQLite or none would keep each replica's "
                "history apart)"
            )

    def _prepare_membership(self, cluster: ClusterSettings) -> None:
        from monitor.cluster.join import membership_for  # aiokafka: only in a cluster

        self.membership = membership_for(
            cluster,
            self.config.kafka.clusters,
            self.config.flows,
            own=self.take_flows,
            disown=self.release_flows,
            local=self.correlator,
            registry=self.registry,
        )
        self.inbox = self.membership

    async def take_flows(self, flows: list[Flow]) -> None:
        """Start flows this replica was given: their open incidents and their topics first,
        then their grid."""
        if self.store is not None:
            await self.store.take_flows([f.name for f in flows])
        await self._watch_owned()
        if self.scheduler is not None:
            self.scheduler.add(flows)

    async def _watch_owned(self) -> None:
        """Read only the topics of the flows this replica owns: with many replicas, each
        topic is read by its owner alone, not by every replica."""
        if self.kafka is None or self.membership is None:
            return
        steps = [s for f in self.membership.owned_flows for s in f.all_steps()]
        await self.kafka.rewatch(KINDS.asked(steps, lambda kind: kind.watches))
        with contextlib.suppress(TimeoutError):  # a broker that is down does not hold us up
            async with asyncio.timeout(10):
                await self.kafka.wait_consumer()

    async def release_flows(self, flows: list[Flow]) -> None:
        """Stop flows another replica will run: runs aborted, gauges gone, incidents written."""
        names = [f.name for f in flows]
        if self.scheduler is not None:
            await self.scheduler.remove(names)
        self.metrics_sink.forget(names)
        await self._watch_owned()
        if self.store is not None:
            await self.store.release_flows(names)

    # -- events out ------------------------------------------------------------------------

    def _add_events_sink(self) -> None:
        """CloudEvents out (`settings.events`); incidents as the store decides them, if any.
        First in line, so it closes last and publishes the store's final decisions."""
        from monitor.events.sink import events_sink  # aiokafka: only when publishing

        assert self.config.settings.events is not None
        book = self.store.book if self.store is not None else None
        sink = events_sink(
            self.config.settings.events, self.config.kafka.clusters,
            replica=self.runner.deps.replica, registry=self.registry, book=book,
        )  # fmt: skip
        self.sinks.add(sink, first=True)

    # -- listeners -------------------------------------------------------------------------

    def needs_public_listener(self) -> bool:
        return bool(routes_from_steps(self.steps))

    def build_public_app(self) -> web.Application:
        """Webhook routes only: the public listener never serves an admin route."""
        app = web.Application()
        routes = routes_from_steps(self.steps)
        self.webhook_paths = install_webhook_routes(
            app,
            routes,
            self.inbox,
            self.metrics.arrivals,
            body_timeout=self.config.settings.webhook_body_timeout,
            reject_log=self.rejects,
        )
        return app

    def build_admin_app(self) -> web.Application:
        host, _ = split_hostport(self.options.admin_listen)
        # An empty token (an unset $VAR on a command line) is no token, not one that any
        # request without a token would match.
        token = self.options.admin_token if (self.options.admin_token or "").strip() else None
        if token is None and not is_loopback(host):
            raise ValueError(
                f"the admin listener on {host} is not loopback: give --admin-token "
                "(or HOPWATCH_ADMIN_TOKEN)"
            )
        app = build_admin_app(self.registry, ready=lambda: self._ready, token=token)
        if self.reloader is not None:
            app.router.add_post("/-/reload", self._reload_handler)
        from monitor.api import install_api_routes  # the admin app's parts: not for `check`
        from monitor.status_page import install_status_routes

        # Asked at each request: a reload replaces self.config, and the answers follow it.
        flows, last = (lambda: self.config.flows), self.last_runs
        install_api_routes(
            app,
            store=self.store,
            flows=flows,
            last_runs=last,
            bearer_auth=token is not None,
            cluster=self.membership.describe if self.membership is not None else None,
            maintenance=self.maintenance,
        )
        install_status_routes(
            app, store=self.store, flows=flows, last_runs=last, maintenance=self.maintenance
        )
        install_gate_routes(app, engine=self, store=self.store, metrics_registry=self.registry)
        return app

    async def _serve(self, app: web.Application, listen: str) -> None:
        self._runners.append(await serve_app(app, listen))

    # -- one-shot runs (check, gate bursts) ------------------------------------------------

    def select(
        self, flows: Sequence[str] = (), variants: Sequence[str] = ()
    ) -> list[tuple[Flow, str]]:
        chosen = []
        for flow in self.config.flows:
            if flows and flow.name not in flows:
                continue
            for variant in flow.variants:
                if variants and variant not in variants:
                    continue
                chosen.append((flow, variant))
        return chosen

    async def run_once(
        self, pairs: Sequence[tuple[Flow, str]], repeat: int = 1, concurrency: int = 16
    ) -> list[RunResult]:
        """Run each (flow, variant) `repeat` times, at most `concurrency` at once."""
        sem = asyncio.Semaphore(concurrency)

        async def one(flow: Flow, variant: str) -> RunResult:
            async with sem:
                return await self.runner.run(flow, variant)

        jobs = [one(f, v) for _ in range(repeat) for f, v in pairs]
        return list(await asyncio.gather(*jobs))
