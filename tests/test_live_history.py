"""Issue 6 proven on the live demo chain: a fault opens one incident for exactly the broken link,
the status page shows it in headless Chromium, and clearing the fault closes it (SQLite and PG)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from monitor.demo.runner import SECRET_ENV
from monitor.demo.webhooks import DEMO_SECRET
from monitor.results import RunResult
from tests.fixtures.demo import Demo, running_demo, short_deadlines
from tests.test_status_page import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed"),
]

# `wrong_body` for canary requests only garbles the shop's order JSON for checkout's canary
# variant and nothing else: its create_order fails its `$.status` assertion and its later hops
# are skipped; stable is untouched, shop_health reads a 404 (no body check) and the worker only
# checks status codes, so order_via_kafka keeps passing.
BROKEN = ("checkout", "canary", "create_order")
REASON = "assertion"
CHECKOUT_HOPS = ["create_order", "order_event", "fulfilment_webhook", "read_back", "order_row"]
RED = "rgb(207, 34, 46)"  # --down in monitor/status_page/templates/base.html.j2
POLL_S = 0.1


def fast_schedule(text: str) -> str:
    """Every flow each second, 3s deadlines, and latency limits a busy 2-core box always meets:
    this test is about incident bookkeeping, so a slow loop must not open a second incident."""
    text = short_deadlines(text)
    # Not the browser flow: a page each second would only load the box (tests/test_browser.py
    # runs checkout_ui).
    text = re.sub(r"\n  - name: checkout_ui\n.*?(?=\n  - name: |\Z)", "", text, flags=re.S)
    text = re.sub(r"interval: \d+s", "interval: 1s", text)
    return re.sub(r"max_latency: \d+ms", "max_latency: 5s", text)


class FaultAfterRun:
    """A sink that switches a fault on the moment a run of `flow` ends.

    The scheduler never overlaps a flow with itself and submits after cleanup, so no run of
    `flow` is in flight then. Switched mid-run, `wrong_body` would fail that run's read_back
    poll instead, and read_back (skipped from then on) would keep a second incident open.
    """

    def __init__(self, flow: str, switch: Callable[[], None], variant: str) -> None:
        self.flow = flow
        self.variant = variant
        self.switch = switch
        self.armed = False
        self.fired = asyncio.Event()

    def submit(self, result: RunResult) -> None:
        mine = result.flow == self.flow and result.variant == self.variant
        if self.armed and mine and not self.fired.is_set():
            self.switch()
            self.fired.set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def poll(
    http: aiohttp.ClientSession,
    url: str,
    done: Callable[[Any], bool],
    timeout: float,
    what: str,
) -> Any:
    """GET `url` every POLL_S until `done(body)`; fail with the last body after `timeout`."""
    body: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                async with http.get(url) as resp:
                    assert resp.status == 200, await resp.text()
                    body = await resp.json()
                if done(body):
                    return body
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        pytest.fail(f"not within {timeout}s: {what}; last answer: {body}")


def link_states(flows: Any) -> dict[tuple[str, str, str], str]:
    return {
        (f["name"], v["variant"], link["step"]): link["status"]
        for f in flows["flows"]
        for v in f["variants"]
        for link in v["links"]
    }


def open_links(page: Any) -> list[tuple[str, str, str, str | None]]:
    return [(i["flow"], i["variant"], i["step"], i["reason"]) for i in page["incidents"]]


@pytest.fixture
async def live(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Demo]:
    """The demo with its scheduler on, every flow each second, and the store enabled."""
    monkeypatch.setenv(SECRET_ENV, DEMO_SECRET)
    async with running_demo(tmp_path, schedule=True, store=store_url, tweak=fast_schedule) as demo:
        yield demo


async def test_a_fault_opens_one_incident_shown_on_the_page_and_closed_after(
    live: Demo, store_url: str
) -> None:
    api = f"{live.admin_url}/api/v1"
    step = BROKEN[2]
    backend = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        flows = await poll(
            http,
            f"{api}/flows",
            lambda b: set(link_states(b).values()) == {"passed"},
            20,
            "every link of every flow passing",
        )
        assert len(link_states(flows)) == 13  # 5 checkout hops x 2 variants, 2 via Kafka, lookup
        # The first runs after start may fail (3s deadlines while the worker's consumer picks
        # up the new topics); wait for the store to have closed those incidents too.
        await poll(
            http,
            f"{api}/incidents?status=open",
            lambda b: b["incidents"] == [],
            10,
            "no open incident before the fault",
        )

        def canary_garbled() -> None:
            live.faults.canary_only = True
            live.faults.wrong_body = True

        switch = FaultAfterRun("checkout", canary_garbled, variant="canary")
        live.engine.sinks.add(switch)
        switch.armed = True
        await asyncio.wait_for(switch.fired.wait(), 10)
        await live.set_faults(wrong_body=True, canary_only=True)  # already on; tell listeners

        opened = await poll(
            http,
            f"{api}/incidents?status=open",
            lambda b: any(i["step"] == step for i in b["incidents"]),
            10,
            "an open incident for the broken link",
        )
        assert open_links(opened) == [(*BROKEN, REASON)]
        incident = opened["incidents"][0]
        assert incident["status"] == "open" and incident["closed_at"] is None
        async with http.get(f"{api}/runs/{incident['first_run_id']}") as resp:
            run = await resp.json()
        assert (run["outcome"], run["broken_step"], run["reason"]) == ("failure", step, REASON)

        await check_page_in_chromium(live.admin_url, incident, backend)

        # Nothing else broke meanwhile: still exactly that one open incident.
        async with http.get(f"{api}/incidents?status=open") as resp:
            assert open_links(await resp.json()) == [(*BROKEN, REASON)]

        await live.clear_faults()
        closed = await poll(
            http,
            f"{api}/incidents?status=all&flow=checkout",
            lambda b: any(
                i["id"] == incident["id"] and i["status"] == "closed" for i in b["incidents"]
            ),
            10,
            "the incident closed",
        )
        mine = next(i for i in closed["incidents"] if i["id"] == incident["id"])
        assert mine["closed_at"] is not None and mine["closed_at"] >= mine["opened_at"]
        assert mine["closing_run_id"] not in (None, mine["first_run_id"])
        assert mine["failures"] >= 1
        await poll(
            http,
            f"{api}/flows",
            lambda b: set(link_states(b).values()) == {"passed"},
            10,
            "every link passing again",
        )
        async with http.get(f"{api}/incidents?status=open") as resp:
            assert (await resp.json())["incidents"] == []


async def check_page_in_chromium(admin_url: str, incident: dict[str, Any], backend: str) -> None:
    """The page shows the red cell and the incident; its link opens the failing run's waterfall."""
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    flow, variant, step = BROKEN
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{admin_url}/")
            cell = page.locator(
                f"td.cell[data-flow='{flow}'][data-variant='{variant}'][data-step='{step}']"
            )
            assert await cell.get_attribute("data-status") == "failed"
            assert await cell.evaluate("e => getComputedStyle(e).borderLeftColor") == RED
            assert await page.locator("td.cell[data-status='failed']").count() == 1
            rows = page.locator("#incidents tr.incident")
            assert await rows.count() == 1
            row = rows.first
            assert await row.get_attribute("data-incident-id") == incident["id"]
            assert await row.get_attribute("data-step") == step
            assert REASON in await row.inner_text()
            await page.screenshot(
                path=str(ARTIFACTS / f"live_status_page_{backend}.png"), full_page=True
            )

            await row.locator("a.run-link").click()
            await page.wait_for_url(f"**/runs/{incident['first_run_id']}")
            hops = page.locator("#waterfall g.hop:not(.cleanup)")
            assert [await h.get_attribute("data-step") for h in await hops.all()] == CHECKOUT_HOPS
            statuses = [await h.get_attribute("data-status") for h in await hops.all()]
            assert statuses == ["failed"] + ["skipped"] * 4
            assert await page.locator("#waterfall rect.phase").count() >= 1  # create_order's
            assert await page.locator("#outcome").inner_text() == "failure"
            await page.screenshot(path=str(ARTIFACTS / f"live_waterfall_{backend}.png"))
        finally:
            await browser.close()
