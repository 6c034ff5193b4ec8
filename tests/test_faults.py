"""Faults at the target, one table: hangs, resets, slow answers, DNS and TLS failures break only
their own link with their reason, while a healthy flow beside them keeps its grid, passes every
run, and every run is counted once by the metrics, the store and the sink."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.engine import Engine, Options
from probes import http_common
from tests.fixtures.core import free_port, serve
from tests.fixtures.dns_server import DnsServer
from tests.fixtures.faults import (
    BadServer,
    LoopbackResolver,
    assert_counted_once,
    assert_on_schedule,
    breaks,
    runs_total,
    scaled,
    store_rows,
)
from tests.test_http import target_app
from tests.test_scheduler import Collect

STEADY_INTERVAL = 0.25


@dataclass(frozen=True)
class Places:
    """Where each fault lives: the healthy target, the raw misbehaving server, the DNS server,
    the TLS servers (by certificate trouble) and the CA the flows trust."""

    target: str
    bad: str
    dns: str
    tls: dict[str, int]
    ca_file: Path


@pytest.fixture
async def tls_servers(tmp_path: Path) -> AsyncIterator[tuple[dict[str, int], Path]]:
    """HTTPS targets whose certificates are expired, self-signed (a CA nobody trusts) and for
    another host; the CA in `ca_file` signs the first and the last."""
    ca, stranger = trustme.CA(), trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    certs = {
        "expired": ca.issue_cert(
            "127.0.0.1",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        ),
        "self_signed": stranger.issue_cert("127.0.0.1"),
        "wrong_host": ca.issue_cert("other.test"),
    }
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    runners, ports = [], {}
    for name, cert in certs.items():
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        runner = web.AppRunner(target_app())
        await runner.setup()
        ports[name] = free_port()
        await web.TCPSite(runner, "127.0.0.1", ports[name], ssl_context=context).start()
        runners.append(runner)
    try:
        yield ports, ca_file
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def places(
    bad_server: BadServer,
    dns_server: DnsServer,
    tls_servers: tuple[dict[str, int], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Places]:
    # Names resolve through the test's DNS server, never the machine's (loopback only).
    monkeypatch.setattr(http_common, "DefaultResolver", lambda: LoopbackResolver(dns_server.port))
    target: TestServer = await serve(target_app())
    ports, ca_file = tls_servers
    try:
        yield Places(
            f"http://127.0.0.1:{target.port}",
            f"http://127.0.0.1:{bad_server.port}",
            dns_server.address,
            ports,
            ca_file,
        )
    finally:
        await target.close()


def https(trouble: str) -> Callable[[Places], str]:
    return lambda p: (
        f"{{kind: http, url: 'https://127.0.0.1:{p.tls[trouble]}/json', "
        f"tls: {{ca_file: '{p.ca_file}'}}}}"
    )


# (fault, the faulty hop as YAML, the reason it must break with)
FAULTS: list[tuple[str, Callable[[Places], str], str]] = [
    ("target hangs", lambda p: f"{{kind: http, url: '{p.target}/hang'}}", "timeout"),
    ("accepts, never answers", lambda p: f"{{kind: http, url: '{p.bad}/silent'}}", "timeout"),
    (
        "slow beyond the deadline",
        lambda p: f"{{kind: http, url: '{p.target}/slow?ms=3000'}}",
        "timeout",
    ),
    (
        "slow beyond the latency budget",
        lambda p: f"{{kind: http, url: '{p.target}/slow?ms=150', expect: {{max_latency: 50ms}}}}",
        "assertion",
    ),
    ("connection reset", lambda p: f"{{kind: http, url: '{p.bad}/reset'}}", "connect_error"),
    (
        "closed without an answer",
        lambda p: f"{{kind: http, url: '{p.bad}/close'}}",
        "connect_error",
    ),
    ("reset mid-body", lambda p: f"{{kind: http, url: '{p.bad}/cut'}}", "connect_error"),
    (
        "connection refused",
        lambda p: f"{{kind: http, url: 'http://127.0.0.1:{free_port()}/json'}}",
        "connect_error",
    ),
    ("name does not exist", lambda p: "{kind: http, url: 'http://nx.test/json'}", "dns_error"),
    ("resolver fails", lambda p: "{kind: http, url: 'http://servfail.test/json'}", "dns_error"),
    (
        "dns: NXDOMAIN",
        lambda p: f"{{kind: dns, server: '{p.dns}', query_name: nx.test}}",
        "assertion",
    ),
    (
        "dns: SERVFAIL",
        lambda p: f"{{kind: dns, server: '{p.dns}', query_name: servfail.test}}",
        "assertion",
    ),
    (
        "dns: server silent",
        lambda p: f"{{kind: dns, server: '{p.dns}', query_name: silent.test}}",
        "timeout",
    ),
    ("tls: expired certificate", https("expired"), "tls_error"),
    ("tls: self-signed certificate", https("self_signed"), "tls_error"),
    ("tls: certificate for another host", https("wrong_host"), "tls_error"),
]


def fault_flows(places: Places, hop: str) -> str:
    ok = f"{{name: ok, kind: http, url: '{places.target}/json'}}"
    return (
        "flows:\n"
        f"  - name: steady\n    interval: {STEADY_INTERVAL}s\n    jitter: 0s\n    timeout: 2s\n"
        f"    steps: [{ok}]\n"
        "  - name: faulty\n    interval: 300ms\n    jitter: 0s\n    timeout: 600ms\n"
        f"    steps:\n      - {{name: before, kind: http, url: '{places.target}/json'}}\n"
        f"      - {{name: hop, {hop.removeprefix('{')}\n"
        f"      - {{name: after, kind: http, url: '{places.target}/json'}}\n"
    )


@pytest.mark.parametrize(("fault", "hop", "reason"), FAULTS, ids=[f[0] for f in FAULTS])
async def test_a_fault_breaks_its_link_alone_and_every_run_is_counted_once(
    fault: str,
    hop: Callable[[Places], str],
    reason: str,
    places: Places,
    load_flows: Callable[[str], Config],
    sqlite_url: str,
) -> None:
    config = load_flows(fault_flows(places, hop(places)))
    sink, registry = Collect(), CollectorRegistry()
    engine = Engine(config, Options(store_url=sqlite_url, grace=0.1, extra_sinks=[sink]), registry)
    await engine.start(admin=False)
    try:
        await sink.wait_for("faulty", scaled(3), timeout=30)
        await sink.wait_for("steady", scaled(8), timeout=30)
    finally:
        await engine.stop()
    finished = breaks(sink.results, "faulty")
    assert set(finished) == {("hop", reason)}, f"{fault}: {finished}"
    for run in sink.of("faulty"):
        if run.outcome != "aborted":
            statuses = [s.status for s in run.steps]
            assert statuses == ["passed", "failed", "skipped"], (fault, statuses)
    assert_on_schedule(sink.results, "steady", STEADY_INTERVAL)
    assert_counted_once(sink.results, runs_total(registry), await store_rows(sqlite_url))
