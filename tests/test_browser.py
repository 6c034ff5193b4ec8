"""The browser kind with the machine's Chromium against the demo shop's order page on loopback:
a passing flow, each failure reason with its evidence, a killed browser, the step limit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.demo.runner import SECRET_ENV
from monitor.demo.shop import FAULTS_KEY, HOOKS_KEY, Faults, build_shop_app
from monitor.demo.webhooks import DEMO_SECRET
from monitor.engine import Engine, serve_app
from monitor.results import RunResult
from monitor.status_page import install_status_routes
from monitor.store import Store
from monitor.store import store as store_module
from monitor.store.rows import ARTIFACT_LIMIT
from probes.browser_pool import DEFAULT_CHROMIUM, BrowserPool
from probes.errors import Artifact
from tests.fixtures.core import free_port
from tests.fixtures.demo import running_demo, short_deadlines
from tests.fixtures.otlp import OtlpReceiver, ReceivedSpan
from tests.fixtures.store import T0, make_run
from tests.test_demo_trace import SERVICES
from tests.test_http import run_flow

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(DEFAULT_CHROMIUM).exists(), reason="Debian chromium missing"),
]
PNG = b"\x89PNG\r\n\x1a\n"
WAIT_RESPONSE = "          - wait_for: {response: /orders, status: 201}\n"


@dataclass
class Shop:
    url: str
    app: web.Application
    posts: list[dict[str, str]] = field(default_factory=list)  # headers of POST /orders
    posted: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event | None = None  # when set: POST /orders waits for it

    @property
    def faults(self) -> Faults:
        return self.app[FAULTS_KEY]


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    app = build_shop_app()
    listen = f"127.0.0.1:{free_port()}"
    found = Shop(f"http://{listen}", app)

    async def record(order: dict[str, Any], request: web.Request) -> None:
        found.posts.append(dict(request.headers))
        found.posted.set()
        if found.gate is not None:
            await found.gate.wait()

    app[HOOKS_KEY].append(record)
    runner = await serve_app(app, listen)
    try:
        yield found
    finally:
        if found.gate is not None:
            found.gate.set()
        await runner.cleanup()


def flow(steps: str, timeout: str = "10s") -> str:
    return (
        f"flows:\n  - name: f\n    timeout: {timeout}\n    variants: {{stable: {{}}}}\n"
        f"    steps:\n{steps}"
    )


def order_step(shop: Shop, *, extra: str = "", actions: str = "", timeout: str = "2s") -> str:
    """The order page's happy path, with `actions` appended and `extra` fields."""
    return f"""\
      - name: ui
        kind: browser
        action_timeout: {timeout}
        actions:
          - goto: "{shop.url}/order?ref={{{{ run.correlation }}}}"
          - fill: "#sku"
            value: "probe-{{{{ run.id }}}}"
          - select: "#quantity"
            value: "2"
          - click: "#place"
{WAIT_RESPONSE}{actions}{extra}"""


async def test_the_order_page_flow_passes_extracts_and_is_marked_and_traced(
    shop: Shop, load_flows: Callable[[str], Config], otel_env: OtlpReceiver
) -> None:
    actions = """\
          - expect: {selector: "#order-status", text: pending}
          - expect: {selector: "#quantity option", count: 3}
          - expect: {selector: "#error", visible: false}
          - expect: {title: "Demo shop"}
          - expect: {url: "*/order?ref=hw-*"}
          - press: "#sku"
            key: End
"""
    extra = """\
        extract:
          order_id: {response: /orders, json: $.id}
          shown_id: {selector: "#order-id"}
          field: {selector: "#sku", attribute: name}
"""
    read_back = f"""\
      - name: read_back
        kind: http
        url: "{shop.url}/orders/{{{{ steps.ui.order_id }}}}"
        expect: {{json: {{$.ref: "{{{{ run.correlation }}}}", $.sku: "probe-{{{{ run.id }}}}"}}}}
"""
    result = await run_flow(load_flows(flow(order_step(shop, actions=actions, extra=extra) +
                                            read_back)))  # fmt: skip
    ui, back = result.steps
    assert (ui.status, ui.message, back.status, back.message) == ("passed", None, "passed", None)
    assert set(ui.phases) == {"setup", "navigation", "actions", "network"}
    assert all(v > 0 for v in ui.phases.values())
    assert ui.attributes["url.full"].startswith(f"{shop.url}/order?ref=hw-")
    [post] = shop.posts
    assert post["X-Hopwatch-Run"] == result.run_id
    assert post["traceparent"].split("-")[1] == result.trace_id
    spans = await otel_env.wait_for(lambda got: any(s.name == "browser ui" for s in got))
    assert any(s.trace_id == result.trace_id for s in spans if s.name == "browser ui")


async def _one(shop: Shop, load: Callable[[str], Config], steps: str) -> RunResult:
    return await run_flow(load(flow(steps)))


@pytest.mark.parametrize(
    ("change", "reason", "message"),
    [
        ({"actions": '          - click: "#nope"\n'}, "assertion",
         "click #nope: no element matches within 2s"),
        ({"actions": '          - expect: {selector: "#order-status", text: shipped}\n'},
         "assertion", "expect selector #order-status: the text is 'pending', want it to contain "
         "'shipped'"),
        ({"actions": '          - expect: {selector: "#place", count: 2}\n'}, "assertion",
         "expect selector #place: 1 elements match, want 2"),
        ({"actions": '          - expect: {title: "Checkout"}\n'}, "assertion",
         "expect title Checkout: the title is 'Demo shop · order', want it to contain 'Checkout'"),
        ({"actions": '          - expect: {url: "*/thanks"}\n'}, "assertion",
         "expect url */thanks: the URL is http://127.0.0.1:"),
        ({"extra": "        extract: {x: {response: /orders, json: $.missing}}\n"}, "extract",
         "x: $.missing not in "),
        ({"extra": '        extract: {x: {selector: "#nope"}}\n'}, "extract",
         "x: no element matches #nope"),
    ],
)  # fmt: skip
async def test_a_page_that_is_not_as_expected_fails_with_its_reason_and_a_screenshot(
    shop: Shop,
    load_flows: Callable[[str], Config],
    change: dict[str, str],
    reason: str,
    message: str,
) -> None:
    [ui] = (await _one(shop, load_flows, order_step(shop, **change))).steps
    assert (ui.status, ui.reason) == ("failed", reason)
    assert ui.message is not None and ui.message.startswith(message), ui.message
    [shot] = ui.artifacts
    assert (shot.name, shot.media_type) == ("screenshot", "image/png")
    assert shot.data.startswith(PNG) and 1000 < len(shot.data) <= 256 * 1024
    assert "setup" in ui.phases and "actions" in ui.phases


async def test_an_api_error_behind_the_page_is_http_status_with_the_console_errors(
    shop: Shop, load_flows: Callable[[str], Config]
) -> None:
    shop.faults.status, shop.faults.paths = 503, ["/orders"]
    [ui] = (await _one(shop, load_flows, order_step(shop))).steps
    assert (ui.status, ui.reason) == ("failed", "http_status")
    assert ui.message == f"POST {shop.url}/orders answered 503, want 201"
    assert ui.excerpt is not None
    assert "console: order failed: injected fault" in ui.excerpt.splitlines()
    assert ui.artifacts[0].data.startswith(PNG)


async def test_a_slow_api_behind_the_page_is_a_timeout_with_its_screenshot(
    shop: Shop, load_flows: Callable[[str], Config]
) -> None:
    shop.gate = asyncio.Event()
    [ui] = (await _one(shop, load_flows, order_step(shop, timeout="1s"))).steps
    assert (ui.status, ui.reason) == ("failed", "timeout")
    assert ui.message == "wait_for response /orders: not within 1s"
    assert ui.phases["network"] >= 1.0
    assert ui.artifacts[0].data.startswith(PNG)


@pytest.mark.parametrize(
    ("url", "reason", "message"),
    [
        ("http://127.0.0.1:{closed}/order", "connect_error", "net::ERR_CONNECTION_REFUSED"),
        ("{shop}/orders/nope", "http_status", "answered 404, want < 400"),
    ],
)
async def test_a_page_that_does_not_open_fails_as_the_network_says(
    shop: Shop, load_flows: Callable[[str], Config], url: str, reason: str, message: str
) -> None:
    target = url.format(closed=free_port(), shop=shop.url)
    step = f'      - {{name: ui, kind: browser, actions: [{{goto: "{target}"}}]}}\n'
    [ui] = (await _one(shop, load_flows, step)).steps
    assert (ui.status, ui.reason) == ("failed", reason)
    assert ui.message is not None and message in ui.message and ui.message.startswith("goto ")


async def test_the_step_running_out_of_time_still_reports_with_evidence(
    shop: Shop, load_flows: Callable[[str], Config]
) -> None:
    shop.gate = asyncio.Event()
    steps = order_step(shop, timeout="30s").replace("kind: browser", "kind: browser\n"
                                                     "        timeout: 6s")  # fmt: skip
    [ui] = (await _one(shop, load_flows, steps)).steps
    assert (ui.status, ui.reason) == ("failed", "timeout")
    # The probe stops before the runner would, so the failure keeps its evidence.
    assert ui.message is not None and ui.message.startswith("wait_for response /orders: not ")
    assert ui.artifacts and ui.latency_s is not None and ui.latency_s < 6.0


@contextlib.asynccontextmanager
async def gated_engine(
    shop: Shop, load_flows: Callable[[str], Config], waiting: str = WAIT_RESPONSE
) -> AsyncIterator[tuple[Engine, BrowserPool]]:
    """An engine for the order flow with the shop holding every POST /orders until let go;
    the step then waits as `waiting` says."""
    shop.gate = asyncio.Event()
    step = order_step(shop, timeout="20s").replace(WAIT_RESPONSE, waiting)
    engine = Engine(load_flows(flow(step, timeout="30s")), registry=CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    try:
        pool = engine.runner.deps.shared["browser"]
        assert isinstance(pool, BrowserPool)
        yield engine, pool
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    "waiting",
    [WAIT_RESPONSE, '          - wait_for: {selector: "#order-id", state: visible}\n'],
    ids=["waiting-for-the-response", "waiting-in-playwright"],
)
async def test_a_killed_browser_fails_only_its_step_and_is_restarted(
    shop: Shop, load_flows: Callable[[str], Config], waiting: str
) -> None:
    async with gated_engine(shop, load_flows, waiting) as (engine, pool):
        run = asyncio.create_task(engine.run_once(engine.select()))
        await asyncio.wait_for(shop.posted.wait(), 20)
        assert pool.pid is not None
        killed = pool.pid
        os.kill(killed, signal.SIGKILL)
        [result] = await asyncio.wait_for(run, 20)
        [ui] = result.steps
        assert (ui.status, ui.reason) == ("failed", "error")
        assert ui.message is not None and "the browser went away" in ui.message
        shop.gate.set()
        shop.gate = None
        [again] = await engine.run_once(engine.select())
        assert [s.status for s in again.steps] == ["passed"]
        assert pool.pid not in (None, killed) and pool.restarts == 1
        assert engine.registry.get_sample_value("hopwatch_browser_restarts_total") == 1


async def test_a_killed_browser_is_found_gone_when_its_connection_drops() -> None:
    """A killed browser closes its pages a moment before Playwright sees its connection drop:
    a step whose page closed waits for that (`gone_within`) to say the browser went away. A
    live browser is not taken for gone."""
    pool = BrowserPool(DEFAULT_CHROMIUM, concurrency=1)
    try:
        async with pool.context() as context:
            await context.new_page()
            assert pool.pid is not None and pool.alive()
            assert not await pool.gone_within(0.05)
            waiting = asyncio.create_task(pool.gone_within(10.0))
            await asyncio.sleep(0)  # listening before the kill
            os.kill(pool.pid, signal.SIGKILL)
            assert await asyncio.wait_for(waiting, 10.0)
            assert not pool.alive()
            assert await pool.gone_within(10.0)  # already gone: at once
    finally:
        await pool.aclose()


async def test_browser_steps_wait_for_one_of_the_slots_and_memory_is_exported(
    shop: Shop, load_flows: Callable[[str], Config]
) -> None:
    async with gated_engine(shop, load_flows) as (engine, pool):
        runs = [asyncio.create_task(engine.run_once(engine.select())) for _ in range(3)]
        assert pool.concurrency == 2
        async with asyncio.timeout(20):
            while len(shop.posts) < 2:
                shop.posted.clear()
                await shop.posted.wait()
        value = engine.registry.get_sample_value
        assert (pool.running, pool.waiting, len(shop.posts)) == (2, 1, 2)
        assert value("hopwatch_browser_steps_running") == 2
        assert value("hopwatch_browser_steps_waiting") == 1
        memory = value("hopwatch_browser_memory_bytes")
        assert memory is not None and memory > 20 * 1024 * 1024
        shop.gate.set()
        results = [r for done in await asyncio.gather(*runs) for r in done]
        assert [s.status for r in results for s in r.steps] == ["passed"] * 3
        await pool.settled()
        assert len(shop.posts) == 3 and (pool.running, pool.waiting) == (0, 0)


async def test_the_screenshot_is_kept_in_the_store_and_shown_on_the_run_page(
    shop: Shop, load_flows: Callable[[str], Config], store: Store
) -> None:
    step = order_step(shop, actions='          - click: "#nope"\n', timeout="1s")
    [ui] = (result := await _one(shop, load_flows, step)).steps
    store.submit(result)
    assert await store.flush()
    [info] = await store.artifacts(result.run_id)
    assert (info.position, info.name, info.media_type) == (0, "screenshot", "image/png")
    assert info.size == len(ui.artifacts[0].data)
    app = web.Application()
    install_status_routes(app, store=store, flows=[], last_runs={})
    async with TestClient(TestServer(app)) as client:
        page = await client.get(f"/runs/{result.run_id}")
        html = await page.text()
        src = f"{result.run_id}/artifacts/0/screenshot"
        assert page.status == 200 and f'src="{src}"' in html
        image = await client.get(f"/runs/{src}")
        assert image.status == 200 and image.content_type == "image/png"
        assert image.headers["X-Content-Type-Options"] == "nosniff"
        assert await image.read() == ui.artifacts[0].data
        assert (await client.get(f"/runs/{result.run_id}/artifacts/1/screenshot")).status == 404
    # Without a store, the latest run of each flow shows its evidence from memory.
    app = web.Application()
    install_status_routes(app, store=None, flows=[], last_runs={("f", "stable"): result})
    async with TestClient(TestServer(app)) as client:
        assert f'src="{src}"' in await (await client.get(f"/runs/{result.run_id}")).text()
        assert await (await client.get(f"/runs/{src}")).read() == ui.artifacts[0].data


async def test_the_store_keeps_only_the_newest_artifacts(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "ARTIFACTS_KEPT", 3)
    runs = [make_run(run_id=f"r{i}", started_at=T0 + i, fail_at="read_back") for i in range(5)]
    for i, run in enumerate(runs):
        run.steps[1].artifacts = [Artifact("screenshot", "image/png", PNG + bytes([i]))]
        store.submit(run)
        assert await store.flush()  # one batch each: the cap holds after every write
    kept = [bool(await store.artifacts(f"r{i}")) for i in range(5)]
    assert kept == [False, False, True, True, True]
    assert await store.artifact("r4", 1, "screenshot") == ("image/png", PNG + b"\x04")
    huge = make_run(run_id="big", fail_at="read_back")
    huge.steps[1].artifacts = [Artifact("screenshot", "image/png", bytes(ARTIFACT_LIMIT + 1))]
    store.submit(huge)
    assert await store.flush()
    assert await store.artifacts("big") == []


async def test_checkout_ui_goes_from_the_page_through_kafka_and_the_webhook_in_one_trace(
    otel_env: OtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, DEMO_SECRET)
    async with running_demo(tmp_path, tweak=short_deadlines) as demo:
        result = await demo.run("checkout_ui")
        assert result.outcome == "success", [(s.name, s.message) for s in result.steps]
        assert [s.name for s in result.steps] == [
            "order_page", "order_event", "fulfilment_webhook", "read_back", "delete_order",
        ]  # fmt: skip
        trace_id = result.trace_id
        assert trace_id is not None

        def complete(_: list[ReceivedSpan]) -> bool:
            return {s.service for s in otel_env.trace(trace_id)} >= SERVICES

        await otel_env.wait_for(complete, timeout=20)
        spans = otel_env.trace(trace_id)
        [page] = [s for s in spans if s.service == "hopwatch" and s.name == "browser order_page"]
        # The shop's POST /orders, made by the page, is a child of the browser step's span.
        assert any(
            s.service == "shop-api" and s.kind == "SERVER" and s.parent_span_id == page.span_id
            for s in spans
        ), [(s.service, s.name, s.kind) for s in spans]


def magenta_pixels(png: bytes) -> int:
    """Pixels of Playwright's mask colour (#FF00FF) in an 8-bit RGB(A) PNG, decoded here (no
    imaging library in the test environment)."""
    width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
    assert depth == 8 and colour in (2, 6)
    at, data = 8, b""
    while at < len(png):
        (size,) = struct.unpack(">I", png[at : at + 4])
        if png[at + 4 : at + 8] == b"IDAT":
            data += png[at + 8 : at + 8 + size]
        at += 12 + size
    raw, step = zlib.decompress(data), 3 if colour == 2 else 4
    stride, previous, count = width * step, bytearray(width * step), 0
    for y in range(height):
        kind, row = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            left = row[i - step] if i >= step else 0
            up, corner = previous[i], previous[i - step] if i >= step else 0
            if kind == 1:
                row[i] = (row[i] + left) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + up) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                near = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                row[i] = (row[i] + near) & 0xFF
        count += sum(row[i : i + 3] == b"\xff\x00\xff" for i in range(0, stride, step))
        previous = row
    return count


async def test_an_input_filled_with_a_secret_is_masked_in_the_screenshot(
    shop: Shop, load_flows: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOPWATCH_TEST_CARD", "4111-1111-1111-1111")
    plain = order_step(shop, actions='          - click: "#nope"\n', timeout="1s")
    secret = plain.replace('"probe-{{ run.id }}"', '"${env:HOPWATCH_TEST_CARD}"')
    assert secret != plain
    [shown] = (await _one(shop, load_flows, plain)).steps
    [masked] = (await _one(shop, load_flows, secret)).steps
    assert magenta_pixels(shown.artifacts[0].data) == 0
    assert magenta_pixels(masked.artifacts[0].data) > 500  # the input's box
