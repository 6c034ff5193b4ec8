"""The http and http_poll kinds through the real runner against a real server on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohappyeyeballs
import pytest
import trustme
from aiohttp import web
from aiohttp.abc import ResolveResult
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.engine import Engine, Options
from monitor.results import RunResult, StepResult
from probes.http_common import TimedResolver, TimedResponseHandler, parse_handshake_rtt
from probes.http_wire import WireConnection
from tests.fixtures.core import free_port, serve

STARTED = web.AppKey("started", asyncio.Event)  # set when a slow or hanging request arrives
PEERS = web.AppKey("peers", list[int])  # the client port of each request to /peer


def target_app() -> web.Application:
    app = web.Application()
    app[STARTED] = asyncio.Event()
    app[PEERS] = []
    hits: dict[str, int] = {}

    async def json_(request: web.Request) -> web.Response:
        return web.json_response(
            {"id": "a/b c", "status": "ok", "n": 3, "items": [{"sku": "x"}]},
            headers={"X-Trace": "t-1"},
        )

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers) | {"query": dict(request.query)})

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(await request.json(), status=201)

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def hang(request: web.Request) -> web.Response:
        request.app[STARTED].set()
        await asyncio.sleep(30)
        return web.Response()

    async def slow(request: web.Request) -> web.Response:
        request.app[STARTED].set()
        await asyncio.sleep(int(request.query.get("ms", "100")) / 1000)
        return web.json_response({"ok": True})

    async def eventually(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        hits[key] = hits.get(key, 0) + 1
        if hits[key] < 3:
            return web.json_response({"status": "pending"})
        return web.json_response({"status": "done"})

    async def item(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "raw": request.raw_path})

    async def peer(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.app[PEERS].append(request.transport.get_extra_info("peername")[1])
        return web.Response()

    app.router.add_get("/json", json_)
    app.router.add_get("/headers", headers)
    app.router.add_post("/echo", echo)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/hang", hang)
    app.router.add_get("/slow", slow)
    app.router.add_get("/eventually/{key}", eventually)
    app.router.add_get("/items/{id}", item)
    app.router.add_get("/peer", peer)
    return app


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    server = await serve(target_app())
    yield server
    await server.close()


def flow_yaml(base: str, steps: str, extra: str = "", cleanup: str = "") -> str:
    text = (
        "flows:\n  - name: f\n    timeout: 5s\n"
        f"    variants: {{stable: {{base_url: '{base}'}}}}\n{extra}    steps:\n{steps}"
    )
    return text + (f"    cleanup:\n{cleanup}" if cleanup else "")


async def run_flow(
    config: Config, registry: CollectorRegistry | None = None, options: Options | None = None
) -> RunResult:
    """Run the config's one flow once, as `hopwatch check` does."""
    engine = Engine(config, options, registry or CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    try:
        [result] = await engine.run_once(engine.select())
        return result
    finally:
        await engine.stop()


def base(target: TestServer) -> str:
    return f"http://127.0.0.1:{target.port}"


async def test_chain_passes_with_assertions_extraction_and_phases(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    steps = """\
      - name: get
        kind: http
        url: "{{ variant.base_url }}/json"
        expect:
          status: 200
          headers: {X-Trace: "t-\\\\d+"}
          json: {"$.status": "ok", "$.n": 3, "$.items[0].sku": "x"}
          body: '"n": 3'
          json_schema: {type: object, required: [id, status]}
          max_latency: 2s
        extract:
          id: {json: "$.id"}
          trace: {header: X-Trace}
          num: {regex: '"n": (\\d+)'}
      - name: use
        kind: http
        url: "{{ variant.base_url }}/items/{{ steps.get.id }}"
        expect:
          json: {"$.path": "/items/a/b c", "$.raw": "/items/a%2Fb%20c"}
      - name: post
        kind: http
        method: POST
        url: "{{ variant.base_url | replace('127.0.0.1', 'localhost') }}/echo"
        json: {ref: "{{ run.correlation }}", trace: "{{ steps.get.trace }}"}
        expect: {status: 201, json: {"$.trace": "t-1"}}
"""
    result = await run_flow(load_flows(flow_yaml(base(target), steps)))
    assert result.outcome == "success", [s.message for s in result.steps]
    get = result.steps[0]
    assert set(get.phases) >= {"connect", "processing", "transfer"}  # an IP: no DNS lookup
    assert all(v >= 0 for v in get.phases.values())
    assert get.latency_s is not None and 0 < get.latency_s < 2
    assert get.attributes["http.response.status_code"] == 200
    assert "dns" in result.steps[2].phases  # a name: looked up afresh in each run


@pytest.mark.parametrize("via_aiohttp", [False, True], ids=["wire", "aiohttp"])
async def test_reused_connection_has_no_connect_phase(
    target: TestServer, load_flows: Callable[[str], Config], via_aiohttp: bool
) -> None:
    """The client marks a connection it makes; a run on a kept one shows only processing
    and transfer (through aiohttp: the private hooks TimedConnector overrides)."""
    follow = ", follow_redirects: true" if via_aiohttp else ""
    step = f"      - {{name: get, kind: http, url: '{{{{ variant.base_url }}}}/json'{follow}}}\n"
    config = load_flows(flow_yaml(base(target), step, extra="    reuse_connections: true\n"))
    engine = Engine(config, registry=CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    try:
        first, second = await engine.run_once(engine.select(), repeat=2, concurrency=1)
    finally:
        await engine.stop()
    assert set(first.steps[0].phases) == {"connect", "processing", "transfer"}
    assert set(second.steps[0].phases) == {"processing", "transfer"}
    assert 0 < second.steps[0].phases["processing"] <= second.steps[0].latency_s


@pytest.mark.parametrize("cleanup", [False, True], ids=["one request", "with cleanup"])
async def test_each_run_is_a_new_client_and_keeps_its_connection_between_its_steps(
    target: TestServer, load_flows: Callable[[str], Config], cleanup: bool
) -> None:
    """Fresh connections (the default): every run connects anew, whether it sends one request
    (a shared session that closes each connection) or several (a session of its own, whose
    connection its later requests to the same host reuse)."""
    get = "      - {name: get, kind: http, url: '{{ variant.base_url }}/peer'}\n"
    again = "      - {name: again, kind: http, url: '{{ variant.base_url }}/peer'}\n"
    config = load_flows(flow_yaml(base(target), get, cleanup=again if cleanup else ""))
    engine = Engine(config, registry=CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    try:
        runs = await engine.run_once(engine.select(), repeat=3, concurrency=1)
    finally:
        await engine.stop()
    assert [r.outcome for r in runs] == ["success"] * 3
    assert all("connect" in r.steps[0].phases for r in runs)
    ports = target.app[PEERS]
    if cleanup:  # each run's two requests came on its one connection
        assert all("connect" not in r.steps[1].phases for r in runs)
        assert ports[0::2] == ports[1::2]
        ports = ports[0::2]
    assert len(ports) == 3 and len(set(ports)) == 3


# Both clients stamp arrival in their protocol: the wire client (plain requests) and aiohttp's
# (redirects followed, HEAD, per-run cookies). `follow_redirects` sends a step through aiohttp.
CLIENTS = pytest.mark.parametrize(
    ("protocol", "via_aiohttp"),
    [(WireConnection, False), (TimedResponseHandler, True)],
    ids=["wire", "aiohttp"],
)


@CLIENTS
async def test_latency_ends_when_the_response_arrives_not_when_the_loop_gets_to_it(
    target: TestServer,
    load_flows: Callable[[str], Config],
    monkeypatch: pytest.MonkeyPatch,
    protocol: Any,
    via_aiohttp: bool,
) -> None:
    """A busy loop delays the request's task, not the protocol's arrival stamp: the step
    reports the target's 50 ms, not the 300 ms the loop was busy after the bytes came."""
    arrived = protocol.data_received
    hogged: list[bool] = []

    def busy_after_arrival(self: Any, data: bytes) -> None:
        if not hogged and data.endswith(b"}"):  # the body's last bytes: the response is in
            hogged.append(True)  # queued ahead of the task's wake-up, as another run would be
            asyncio.get_running_loop().call_soon(time.sleep, 0.3)
        arrived(self, data)

    monkeypatch.setattr(protocol, "data_received", busy_after_arrival)
    step = slow_step(via_aiohttp)
    result = await run_flow(load_flows(flow_yaml(base(target), step)))
    assert hogged and result.outcome == "success", result.steps[0].message
    assert result.duration_s >= 0.3
    latency = result.steps[0].latency_s
    assert latency is not None and 0.05 <= latency < 0.25
    assert result.steps[0].phases["processing"] >= 0.05


@CLIENTS
async def test_latency_leaves_out_the_wait_between_connect_and_send(
    target: TestServer,
    load_flows: Callable[[str], Config],
    monkeypatch: pytest.MonkeyPatch,
    protocol: Any,
    via_aiohttp: bool,
) -> None:
    """A new connection is made, then the loop is busy 300 ms before the request's task can
    send on it: that wait is the monitor's, not the target's, and is not reported."""
    made = protocol.connection_made

    def busy_after_connect(self: Any, transport: asyncio.BaseTransport) -> None:
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # ahead of the task's wake-up
        made(self, transport)

    monkeypatch.setattr(protocol, "connection_made", busy_after_connect)
    get = await slow_step_on_a_busy_loop(target, load_flows, via_aiohttp)
    assert get.phases["connect"] < 0.25 and get.phases["processing"] >= 0.05


def slow_step(via_aiohttp: bool = False) -> str:
    """A step the target answers in 50 ms."""
    follow = ", follow_redirects: true" if via_aiohttp else ""
    return (
        f"      - {{name: get, kind: http, url: '{{{{ variant.base_url }}}}/slow?ms=50'{follow}}}\n"
    )


async def slow_step_on_a_busy_loop(
    target: TestServer, load_flows: Callable[[str], Config], via_aiohttp: bool = False
) -> StepResult:
    """Run a step the target answers in 50 ms while the loop is kept busy 300 ms: it passes
    and reports the target's time, not the loop's."""
    result = await run_flow(load_flows(flow_yaml(base(target), slow_step(via_aiohttp))))
    assert result.outcome == "success", result.steps[0].message
    assert result.duration_s >= 0.3
    get = result.steps[0]
    assert get.latency_s is not None and 0.05 <= get.latency_s < 0.25
    return get


def hog_loop_after_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the loop busy 300 ms right after each connection's TCP handshake, before the
    connecting task resumes, as other runs' work would."""
    connect = aiohappyeyeballs.start_connection

    async def busy(*args: Any, **kwargs: Any) -> socket.socket:
        sock = await connect(*args, **kwargs)
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # ahead of this task's wake-up
        await asyncio.sleep(0)
        return sock

    monkeypatch.setattr(aiohappyeyeballs, "start_connection", busy)


@pytest.mark.parametrize("via_aiohttp", [False, True], ids=["wire", "aiohttp"])
async def test_connect_is_the_kernels_handshake_not_the_loops_wait(
    target: TestServer,
    load_flows: Callable[[str], Config],
    monkeypatch: pytest.MonkeyPatch,
    via_aiohttp: bool,
) -> None:
    """The handshake is done, but the loop is busy 300 ms before it learns so (as behind other
    runs' work): the connect phase is the kernel's round trip, and the wait is not reported."""
    hog_loop_after_handshake(monkeypatch)
    get = await slow_step_on_a_busy_loop(target, load_flows, via_aiohttp)
    assert 0 < get.phases["connect"] < 0.05


async def test_a_refused_first_address_keeps_the_loops_connect_figure(
    target: TestServer, load_flows: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name whose first address refuses (127.0.0.2: nothing listens there) and whose second
    answers: the time spent on the first attempt is the client's too, so the connect phase is
    what the loop saw, busy wait included, not the second handshake alone."""

    async def two_addresses(
        self: TimedResolver, host: str, port: int = 0, family: socket.AddressFamily = 0
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=ip, port=port, family=socket.AF_INET, proto=0,
                          flags=socket.AI_NUMERICHOST)
            for ip in ("127.0.0.2", "127.0.0.1")
        ]  # fmt: skip

    monkeypatch.setattr(TimedResolver, "resolve", two_addresses)
    hog_loop_after_handshake(monkeypatch)
    url = f"http://twice.test:{target.port}/slow?ms=50"
    step = f"      - {{name: get, kind: http, url: '{url}'}}\n"
    result = await run_flow(load_flows(flow_yaml(base(target), step)))
    assert result.outcome == "success", result.steps[0].message
    assert result.steps[0].phases["connect"] >= 0.3


def test_tcp_info_reading() -> None:
    """tcpi_rtt (µs) at byte 68, tcpi_total_retrans at byte 100; a retransmitted handshake
    (a lost SYN) or a kernel without a sample leaves the loop's figure in place."""

    def tcp_info(rtt_us: int, retrans: int) -> bytes:
        raw = bytearray(104)
        struct.pack_into("=I", raw, 68, rtt_us)
        struct.pack_into("=I", raw, 100, retrans)
        return bytes(raw)

    assert parse_handshake_rtt(tcp_info(31, 0)) == pytest.approx(31e-6)
    assert parse_handshake_rtt(tcp_info(31, 1)) is None
    assert parse_handshake_rtt(tcp_info(0, 0)) is None
    assert parse_handshake_rtt(tcp_info(31, 0)[:90]) is None


@pytest.mark.parametrize(
    ("expect", "reason", "message"),
    [
        ("{status: 201}", "http_status", "status 200, want 201"),
        ('{json: {"$.status": "pending"}}', "assertion", "$.status is 'ok', want 'pending'"),
        ('{json: {"$.missing": 1}}', "assertion", "$.missing missing, want 1"),
        ("{headers: {X-Trace: 'z.*'}}", "assertion", "header X-Trace is 't-1', want /z.*/"),
        ("{body: 'absent'}", "assertion", "body does not contain /absent/"),
        ("{json_schema: {type: object, required: [nope]}}", "assertion",
         "body fails JSON Schema at (root): 'nope' is a required property"),
        ("{max_latency: 1ms}", "assertion", "want <= 1ms"),
    ],
)  # fmt: skip
async def test_broken_link_reason_and_message(
    target: TestServer, load_flows: Callable[[str], Config], expect: str, reason: str, message: str
) -> None:
    steps = f"""\
      - name: get
        kind: http
        url: "{{{{ variant.base_url }}}}/{"slow?ms=20" if "latency" in expect else "json"}"
        expect: {expect}
      - name: after
        kind: http
        url: "{{{{ variant.base_url }}}}/json"
"""
    result = await run_flow(load_flows(flow_yaml(base(target), steps)))
    broken = result.broken
    assert result.outcome == "failure"
    assert broken is not None and broken.name == "get"
    assert broken.reason == reason
    assert message in (broken.message or "")
    assert result.steps[1].status == "skipped"  # one break is counted once


async def test_a_reloaded_flow_runs_with_its_new_variant_values(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    """A reload that changes a variant's values keeps the flow's name: its runs must use the
    new values (the runner once kept a variant's values by flow name, for good)."""
    steps = "      - {name: s, kind: http, url: '{{ variant.base_url }}'}\n"
    before = load_flows(flow_yaml(f"{base(target)}/json", steps))
    after = load_flows(flow_yaml(f"{base(target)}/status/503", steps))
    engine = Engine(before, None, CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    try:
        first = await engine.runner.run(before.flows[0], "stable", submit=False)
        second = await engine.runner.run(after.flows[0], "stable", submit=False)
    finally:
        await engine.stop()
    assert first.outcome == "success", first.steps[0].message
    assert (second.outcome, second.steps[0].reason) == ("failure", "http_status")


async def test_connect_error_timeout_and_extract(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    closed = free_port()
    cases = {
        f"http://127.0.0.1:{closed}/": "connect_error",
        f"{base(target)}/hang": "timeout",
    }
    for url, reason in cases.items():
        steps = f"      - {{name: s, kind: http, url: '{url}', timeout: 300ms}}\n"
        result = await run_flow(load_flows(flow_yaml(base(target), steps)))
        assert result.steps[0].reason == reason, result.steps[0].message
    steps = (
        "      - {name: s, kind: http, url: '{{ variant.base_url }}/json',"
        " extract: {x: {json: '$.nope'}}}\n"
    )
    result = await run_flow(load_flows(flow_yaml(base(target), steps)))
    assert (result.steps[0].reason, result.steps[0].message) == ("extract", "x: $.nope not in body")
    assert result.steps[0].excerpt and '"status": "ok"' in result.steps[0].excerpt


async def test_marker_header_auth_query_and_variant_headers(
    target: TestServer, load_flows: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HW_PASS", "pa55word")
    creds = base64.b64encode(b"probe:pa55word").decode()
    steps = f"""\
      - name: basic
        kind: http
        url: "{{{{ variant.base_url }}}}/headers"
        query: {{q: "{{{{ run.correlation }}}}"}}
        headers: {{X-Extra: "yes"}}
        auth: {{basic: {{username: probe, password: "${{env:HW_PASS}}"}}}}
        expect:
          json:
            "$.X-Hopwatch-Run": "{{{{ run.id }}}}"
            "$.query.q": "{{{{ run.correlation }}}}"
            "$.X-Canary": always
            "$.X-Extra": "yes"
            "$.Authorization": "Basic {creds}"
            "$.User-Agent": hopwatch
      - name: own_agent
        kind: http
        url: "{{{{ variant.base_url }}}}/headers"
        headers: {{User-Agent: "shop-probe/1"}}
        expect: {{json: {{"$.User-Agent": "shop-probe/1"}}}}
"""
    text = flow_yaml(base(target), steps).replace(
        "{stable: {base_url", "{canary: {headers: {X-Canary: always}, base_url"
    )
    result = await run_flow(load_flows(text))
    assert result.variant == "canary"
    assert result.outcome == "success", [step.message for step in result.steps]


async def test_poll_reports_time_to_appear_and_fails_with_last_reason(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    steps = """\
      - name: wait
        kind: http_poll
        url: "{{ variant.base_url }}/eventually/{{ run.id }}"
        until: {json: {"$.status": "done"}}
        every: 50ms
        within: 3s
"""
    result = await run_flow(load_flows(flow_yaml(base(target), steps)))
    step = result.steps[0]
    assert step.status == "passed" and step.attributes["attempts"] == 3
    assert step.latency_s is not None and step.latency_s >= 0.1  # two pauses of 50ms
    steps = steps.replace('"done"', '"never"').replace("within: 3s", "within: 300ms")
    result = await run_flow(load_flows(flow_yaml(base(target), steps)))
    step = result.steps[0]
    assert step.reason == "assertion"
    assert "$.status is 'done', want 'never' (still, after" in (step.message or "")


async def test_poll_gives_up_at_within_even_while_a_request_hangs(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    """`within` bounds the hop: a hung request was only cut by the run's timeout (the soak's API
    hang: `read_back`, within 10s, failed after 19.6 s)."""
    steps = (
        "      - {name: poll, kind: http_poll, url: '{{ variant.base_url }}/hang',"
        " until: {status: 200}, within: 300ms}\n"
    )
    started = time.monotonic()
    result = await run_flow(load_flows(flow_yaml(base(target), steps)))  # run timeout 5s
    took = time.monotonic() - started
    step = result.steps[0]
    assert (step.status, step.reason) == ("failed", "timeout")
    assert "unanswered at the 0.3s deadline" in (step.message or "")
    assert took < 2.0, took


async def test_cleanup_always_runs_and_is_not_a_hop(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    steps = "      - {name: s, kind: http, url: '{{ variant.base_url }}/status/503'}\n"
    cleanup = (
        "      - {name: c1, kind: http, url: '{{ variant.base_url }}/json'}\n"
        "      - {name: c2, kind: http, url: '{{ variant.base_url }}/status/500'}\n"
    )
    registry = CollectorRegistry()
    result = await run_flow(load_flows(flow_yaml(base(target), steps, cleanup=cleanup)), registry)
    assert [(s.name, s.status, s.cleanup) for s in result.steps] == [
        ("s", "failed", False),
        ("c1", "passed", True),
        ("c2", "failed", True),
    ]
    assert result.broken is not None and result.broken.name == "s"
    labels = {"flow": "f", "step": "c2", "variant": "stable", "location": "local"}
    assert registry.get_sample_value("hopwatch_cleanup_failures_total", labels) == 1
    assert registry.get_sample_value("hopwatch_link_up", {**labels, "step": "c2"}) is None


async def test_a_broken_link_is_signalled_before_its_runs_cleanup_ends(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    """A cleanup on a hung system (the soak's DELETE on a hanging API) held the run's result,
    so a broken link reached the metrics only at the run's timeout. The hops' signal goes out
    when they are done; the run's own count and duration when its cleanup is."""
    steps = "      - {name: s, kind: http, url: '{{ variant.base_url }}/status/503'}\n"
    cleanup = "      - {name: c, kind: http, url: '{{ variant.base_url }}/slow?ms=1500'}\n"
    registry = CollectorRegistry()
    run = asyncio.create_task(
        run_flow(load_flows(flow_yaml(base(target), steps, cleanup=cleanup)), registry)
    )
    link = {"flow": "f", "step": "s", "variant": "stable", "location": "local"}
    flow = {"flow": "f", "variant": "stable", "location": "local"}
    async with asyncio.timeout(1.2):  # well before the cleanup's 1.5 s answer
        while registry.get_sample_value("hopwatch_link_up", link) != 0.0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # a gauge has no event to await
    assert not run.done()
    assert registry.get_sample_value("hopwatch_flow_up", flow) == 0.0
    failures = {**link, "kind": "http", "reason": "http_status"}
    assert registry.get_sample_value("hopwatch_step_failures_total", failures) == 1
    assert not registry.get_sample_value("hopwatch_runs_total", {**flow, "outcome": "failure"})
    result = await run
    assert [(st.name, st.status) for st in result.steps] == [("s", "failed"), ("c", "passed")]
    assert registry.get_sample_value("hopwatch_runs_total", {**flow, "outcome": "failure"}) == 1
    assert registry.get_sample_value("hopwatch_step_failures_total", failures) == 1  # once
    duration = registry.get_sample_value("hopwatch_run_duration_seconds_sum", flow) or 0.0
    assert duration >= 1.5  # the run's duration is the whole run, cleanup included


async def test_tls_verification_phases_and_custom_ca(
    load_flows: Callable[[str], Config], tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    runner = web.AppRunner(target_app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ctx).start()
    try:
        url = f"https://127.0.0.1:{port}/json"
        trusted = f"      - {{name: s, kind: http, url: '{url}', tls: {{ca_file: '{ca_file}'}}}}\n"
        result = await run_flow(load_flows(flow_yaml("x", trusted)))
        assert result.outcome == "success", result.steps[0].message
        assert result.steps[0].phases["tls"] > 0
        untrusted = f"      - {{name: s, kind: http, url: '{url}'}}\n"
        result = await run_flow(load_flows(flow_yaml("x", untrusted)))
        assert result.steps[0].reason == "tls_error"
        # A kept connection still knows its certificate in the runs that reuse it.
        kept = trusted.replace("}}\n", "}, expect: {tls_valid_for: 1d}}\n")
        config = load_flows(flow_yaml("x", kept, extra="    reuse_connections: true\n"))
        engine = Engine(config, registry=CollectorRegistry())
        await engine.start(schedule=False, admin=False)
        try:
            runs = await engine.run_once(engine.select(), repeat=2, concurrency=1)
        finally:
            await engine.stop()
        assert [r.outcome for r in runs] == ["success", "success"], runs[1].steps[0].message
        assert "tls" in runs[0].steps[0].phases and "tls" not in runs[1].steps[0].phases
        assert runs[0].steps[0].tls_not_after == runs[1].steps[0].tls_not_after is not None
    finally:
        await runner.cleanup()


async def test_secrets_never_reach_results(
    target: TestServer, load_flows: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HW_TOKEN", "tok-very-secret")
    steps = """\
      - name: s
        kind: http
        url: "{{ variant.base_url }}/headers"
        auth: {bearer: "${env:HW_TOKEN}"}
        expect: {json: {"$.nothing": 1}}
"""
    result = await run_flow(load_flows(flow_yaml(base(target), steps)))
    dumped = json.dumps(result.to_dict())
    assert result.steps[0].reason == "assertion"
    assert "tok-very-secret" not in dumped
    assert "Bearer ***" in dumped  # the echoed header is in the excerpt, masked


async def test_cleanup_still_gets_values_from_a_step_whose_checks_failed(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    """The request created something even though its answer was wrong: cleanup must undo it."""
    steps = (
        "      - {name: create, kind: http, url: '{{ variant.base_url }}/json',"
        " expect: {status: 201}, extract: {id: {json: '$.id'}}}\n"
    )
    cleanup = (
        "      - {name: undo, kind: http,"
        " url: '{{ variant.base_url }}/items/{{ steps.create.id }}'}\n"
    )
    result = await run_flow(load_flows(flow_yaml(base(target), steps, cleanup=cleanup)))
    assert [(s.name, s.status) for s in result.steps] == [("create", "failed"), ("undo", "passed")]


async def test_cleanup_needing_a_value_never_produced_is_skipped_plainly(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    """An early failure left nothing to clean up: say so, not a raw template error."""
    steps = (
        "      - {name: broken, kind: http, url: '{{ variant.base_url }}/status/503'}\n"
        "      - {name: create, kind: http, url: '{{ variant.base_url }}/json',"
        " extract: {id: {json: '$.id'}}}\n"
    )
    cleanup = (
        "      - {name: undo, kind: http,"
        " url: '{{ variant.base_url }}/items/{{ steps.create.id }}'}\n"
    )
    result = await run_flow(load_flows(flow_yaml(base(target), steps, cleanup=cleanup)))
    assert [(s.name, s.status) for s in result.steps] == [
        ("broken", "failed"),
        ("create", "skipped"),
        ("undo", "skipped"),
    ]
    assert result.steps[1].message == "skipped: broken broke (http_status)"
    assert result.steps[2].message == (
        "skipped: needs steps.create.id, which this run never produced (create skipped)"
    )
