"""The status page: rendered HTML over a real store, and the live page in headless Chromium."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from monitor.api import install_api_routes
from monitor.results import RunResult
from monitor.status_page import install_status_routes, make_environment
from monitor.status_page.svg import nice_step, slow_note, sparkline, waterfall
from monitor.store import LinkPoint, RunDetail, Store
from tests.fixtures.store import T0, flow_stub, make_run

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FLOWS = [
    flow_stub("checkout", ["create_order", "read_back"], ["stable", "canary"]),
    flow_stub("via_kafka", ["command", "confirmation"]),
]

Client = TestClient[web.Request, web.Application]


def _app(
    store: Store | None, last_runs: dict[tuple[str, str], RunResult], refresh_s: float = 10.0
) -> web.Application:
    app = web.Application()
    install_api_routes(app, store=store, flows=FLOWS, last_runs=last_runs, bearer_auth=False)
    install_status_routes(app, store=store, flows=FLOWS, last_runs=last_runs, refresh_s=refresh_s)
    return app


def _record(store: Store, last_runs: dict[tuple[str, str], RunResult], run: RunResult) -> None:
    """What the runner does with a result: keep it as the latest, hand it to the store."""
    last_runs[(run.flow, run.variant)] = run
    store.submit(run)


async def _healthy_history(store: Store, last_runs: dict[tuple[str, str], RunResult]) -> None:
    for i in range(6):
        at = T0 + i * 30
        for variant in ("stable", "canary"):
            _record(
                store, last_runs, make_run(variant=variant, started_at=at, latency_s=0.02 + i / 500)
            )
        _record(
            store,
            last_runs,
            make_run(flow="via_kafka", steps=["command", "confirmation"], started_at=at),
        )
    assert await store.flush()


@pytest.fixture
async def sqlite_store(sqlite_url: str) -> AsyncIterator[Store]:
    store = Store(sqlite_url, linger_s=0.01)
    await store.migrate()
    await store.start()
    yield store
    await store.close()


async def test_page_shows_links_incidents_and_runs(store: Store) -> None:
    last_runs: dict[tuple[str, str], RunResult] = {}
    await _healthy_history(store, last_runs)
    broken = make_run(variant="canary", started_at=T0 + 300, fail_at="read_back", reason="timeout")
    _record(store, last_runs, broken)
    assert await store.flush()

    async with TestClient(TestServer(_app(store, last_runs), host="127.0.0.1")) as client:
        resp = await client.get("/")
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
    cells = re.findall(
        r'<td class="cell (\w+)" data-flow="(\w+)" data-variant="(\w+)"\s+data-step="(\w+)"', html
    )
    assert ("failed", "checkout", "canary", "read_back") in cells
    assert [c for c in cells if c[0] != "passed"] == [("failed", "checkout", "canary", "read_back")]
    assert 'data-step="create_order" data-status="passed"' in html
    assert 'data-incident-id="' in html and 'data-step="read_back"' in html
    assert f'href="runs/{broken.run_id}"' in html
    assert 'class="spark"' in html


async def test_page_reads_skipped_slow_and_only_configured_links(store: Store) -> None:
    last_runs: dict[tuple[str, str], RunResult] = {}
    await _healthy_history(store, last_runs)
    # a flow that is no longer configured left an open incident behind
    store.submit(make_run(flow="renamed_away", started_at=T0 + 200, fail_at="read_back"))
    # stable: create_order broke, read_back skipped; canary: read_back took 6 s, and passed
    _record(store, last_runs, make_run(variant="stable", started_at=T0 + 300,
                                       fail_at="create_order"))  # fmt: skip
    slow = make_run(variant="canary", started_at=T0 + 300)
    slow.steps[1].latency_s = 6.0
    _record(store, last_runs, slow)
    assert await store.flush()
    async with TestClient(TestServer(_app(store, last_runs), host="127.0.0.1")) as client:
        html = await (await client.get("/")).text()
    cells = dict(
        ((variant, step), classes)
        for classes, variant, step in re.findall(
            r'<td class="cell ([\w ]+)" data-flow="checkout" data-variant="(\w+)"\s+'
            r'data-step="(\w+)"',
            html,
        )
    )
    assert cells[("stable", "read_back")] == "skipped"
    assert cells[("canary", "read_back")] == "passed slow"
    assert cells[("canary", "create_order")] == "passed"
    assert "slow: 3e+02 times" not in html and "times its usual" in html
    incidents = re.findall(r'class="incident" data-incident-id="[^"]+" data-flow="(\w+)"', html)
    assert incidents == ["checkout"]  # renamed_away's incident is not on the page
    assert 'class="muted spark-scale"' in html


async def test_run_page_draws_the_waterfall_and_escapes_the_excerpt(store: Store) -> None:
    run = make_run(
        fail_at="read_back", excerpt="<script>alert(1)</script>", cleanup=["delete_order"]
    )
    store.submit(run)
    assert await store.flush()
    async with TestClient(TestServer(_app(store, {}), host="127.0.0.1")) as client:
        resp = await client.get(f"/runs/{run.run_id}")
        assert resp.status == 200
        html = await resp.text()
        missing = await client.get("/runs/nope")
        assert missing.status == 404
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'id="waterfall"' in html
    assert 'class="hop failed" data-step="read_back"' in html
    assert 'class="hop passed cleanup" data-step="delete_order"' in html
    assert 'data-phase="dns"' in html and 'data-phase="processing"' in html
    assert run.trace_id is not None and run.trace_id in html


async def test_page_without_a_store_uses_the_latest_results() -> None:
    last_runs = {("checkout", "stable"): make_run(variant="stable", fail_at="create_order")}
    async with TestClient(TestServer(_app(None, last_runs), host="127.0.0.1")) as client:
        html = await (await client.get("/")).text()
        run_page = await client.get(f"/runs/{last_runs['checkout', 'stable'].run_id}")
        assert run_page.status == 200  # the in-memory run is shown without a store
    assert "No store configured" in html
    assert 'data-step="create_order" data-status="failed"' in html


async def test_page_says_when_the_store_is_away() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = Store(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x")
    try:
        async with TestClient(TestServer(_app(store, {}), host="127.0.0.1")) as client:
            resp = await client.get("/")
            assert resp.status == 200
            assert 'id="store-error"' in await resp.text()
    finally:
        await store.engine.dispose()


def test_waterfall_geometry_puts_phases_inside_their_hop() -> None:
    run = RunDetail.model_validate(
        make_run(fail_at="read_back", cleanup=["delete_order"]).to_dict()
    )
    fall = waterfall(run, width=900, label_width=190)
    first, second, cleanup = fall.hops
    assert first.x == 190 and second.x > first.x + first.width - 0.01
    assert [p.name for p in first.phases] == ["dns", "connect", "processing", "transfer"]
    assert first.phases[0].x == first.x
    end = first.phases[-1].x + first.phases[-1].width
    assert end == pytest.approx(first.x + first.width, abs=0.05)
    assert cleanup.cleanup and fall.ticks[0] == (190, "0")


@pytest.mark.parametrize(
    ("span", "step"), [(0.045, 0.01), (1.0, 0.2), (7.0, 2.0), (0.0, 1.0), (130.0, 50.0)]
)
def test_ticks_are_round(span: float, step: float) -> None:
    assert nice_step(span) == pytest.approx(step)


def test_slow_note() -> None:
    usual = [LinkPoint(T0 + i, 0.05, "passed") for i in range(5)]
    assert slow_note(0.06, [*usual, usual[0]], 20.0) is None
    assert slow_note(6.0, [*usual, usual[0]], 20.0) == "slow: 120.0 times its usual 50 ms"
    assert slow_note(0.01, [], 0.015) == "slow: 67% of the flow's 15 ms limit"
    assert slow_note(None, usual, 1.0) is None


def test_sparkline_marks_failures() -> None:
    points = [LinkPoint(T0 + i, 0.01 * (i + 1), "failed" if i == 2 else "passed") for i in range(5)]
    spark = sparkline(points)
    assert spark is not None
    assert spark.path.startswith("M") and spark.path.count("L") == 3
    assert len(spark.failures) == 1
    assert sparkline([]) is None


# --- the real browser --------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed")
async def test_browser_sees_a_broken_link_open_an_incident_and_its_waterfall(
    sqlite_store: Store,
) -> None:
    from playwright.async_api import async_playwright

    store = sqlite_store
    last_runs: dict[tuple[str, str], RunResult] = {}
    await _healthy_history(store, last_runs)
    runner = web.AppRunner(_app(store, last_runs, refresh_s=0.3))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                await page.goto(f"{base}/")
                cells = page.locator("td.cell")
                assert await cells.count() == 6
                assert await page.locator("td.cell[data-status='passed']").count() == 6
                assert await page.locator("#incidents tr.incident").count() == 0

                # The fault goes on: read_back of the canary variant breaks.
                broken = make_run(
                    variant="canary",
                    started_at=T0 + 400,
                    fail_at="read_back",
                    reason="http_status",
                    excerpt='{"error": "upstream unavailable"}',
                )
                _record(store, last_runs, broken)
                assert await store.flush()

                # No reload: the page refreshes its live part by itself.
                red = page.locator(
                    "td.cell[data-flow='checkout'][data-variant='canary'][data-step='read_back']"
                )
                await red.and_(page.locator("[data-status='failed']")).wait_for(timeout=10_000)
                colour = await red.evaluate("e => getComputedStyle(e).borderLeftColor")
                assert colour == "rgb(207, 34, 46)"  # --down: red
                others = page.locator("td.cell[data-status='passed']")
                assert await others.count() == 5
                incident = page.locator("#incidents tr.incident")
                await incident.first.wait_for(timeout=10_000)
                assert await incident.count() == 1
                assert await incident.get_attribute("data-step") == "read_back"
                assert await incident.get_attribute("data-variant") == "canary"
                await page.screenshot(path=str(ARTIFACTS / "status_page.png"), full_page=True)

                # The incident's first failing run opens its waterfall.
                await incident.locator("a.run-link").click()
                await page.wait_for_url(f"**/runs/{broken.run_id}")
                hop = page.locator("#waterfall g.hop[data-step='read_back']")
                assert await hop.get_attribute("data-status") == "failed"
                assert await page.locator("#waterfall g.hop").count() == 2
                assert await page.locator("#waterfall rect.phase").count() == 8
                assert "upstream unavailable" in await page.locator("pre.excerpt").inner_text()
                assert await page.locator("#trace-id").inner_text() == broken.trace_id
                await page.screenshot(path=str(ARTIFACTS / "status_page_waterfall.png"))

                # The fault is cleared: the link turns green and the incident closes.
                await page.go_back()
                _record(store, last_runs, make_run(variant="canary", started_at=T0 + 430))
                assert await store.flush()
                await red.and_(page.locator("[data-status='passed']")).wait_for(timeout=10_000)
                await incident.first.wait_for(state="detached", timeout=10_000)
            finally:
                await browser.close()
    finally:
        await runner.cleanup()


def test_waterfall_draws_every_wait_at_its_length_and_what_it_waited_for() -> None:
    """A failed 10 s wait is a 10 s bar, not a tick at 0; a passed wait shows its duplicate
    window after the arrival."""
    run = make_run(steps=["create_order", "order_event", "fulfilment_webhook"])
    hook, event = run.steps[2], run.steps[1]
    event.status, event.reason, event.latency_s, event.duration_s = (
        "failed",
        "not_received",
        None,
        10.0,
    )
    event.attributes = {"wait.for": "record on orders with $.order_id='ord-7'"}
    hook.status, hook.latency_s, hook.duration_s = "skipped", None, None
    detail = RunDetail.model_validate(run.to_dict())
    fall = waterfall(detail, width=900, label_width=190)
    _, failed, _ = fall.hops
    (wait,) = failed.waits
    assert wait.name == "wait" and wait.seconds == 10.0
    assert failed.width == pytest.approx(wait.width) and failed.width > 500
    assert failed.note == "waited 10 s for record on orders with $.order_id='ord-7'"

    passed = make_run(steps=["create_order", "fulfilment_webhook"])
    hop = passed.steps[1]
    hop.duration_s, hop.kind, hop.phases = 0.35, "webhook_await", {}
    hop.attributes = {"wait.for": "delivery on /hooks/fulfilment", "wait.arrived_s": 0.05,
                      "wait.duplicate_window_s": 0.3}  # fmt: skip
    fall = waterfall(RunDetail.model_validate(passed.to_dict()), width=900, label_width=190)
    waited, window = fall.hops[1].waits
    assert (waited.name, window.name) == ("wait", "duplicate_window")
    assert (waited.seconds, window.seconds) == pytest.approx((0.05, 0.3))
    assert window.x == pytest.approx(waited.x + waited.width, abs=0.02)
    assert "then 300 ms of duplicate_window" in (fall.hops[1].note or "")
    html = make_environment().get_template("run.html.j2").render(
        now=T0, refresh_s=10.0, has_store=True, run=RunDetail.model_validate(passed.to_dict()),
        fall=fall,
    )  # fmt: skip
    assert 'data-wait="duplicate_window"' in html and "waited 50 ms for delivery" in html
