"""XPath checks and extraction on XML bodies: the SOAP example against a small SOAP service on
loopback, and hostile bodies (entity expansion, external entities) refused without effect."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from lxml import etree
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.engine import Engine, Options
from tests.fixtures.core import serve
from tests.test_http import run_flow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "soap.yaml"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
ORDERS = "urn:example:orders"
NS = {"soap": SOAP, "o": ORDERS}
ENVELOPE = (
    f'<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="{SOAP}" '
    f'xmlns:o="{ORDERS}"><soap:Body>{{}}</soap:Body></soap:Envelope>'
)


def soap_service() -> web.Application:
    """PlaceOrder and GetOrderStatus, SOAP 1.1; a Fault for an order it does not know."""
    app = web.Application()
    orders: dict[str, tuple[str, str]] = {}
    ids = itertools.count(1001)

    async def endpoint(request: web.Request) -> web.Response:
        root = etree.fromstring(await request.read(), etree.XMLParser(resolve_entities=False))
        action = request.headers.get("SOAPAction", "").rpartition("/")[2]
        if action == "PlaceOrder":
            sku = root.findtext(".//o:Sku", namespaces=NS)
            ref = root.findtext(".//o:Ref", namespaces=NS)
            order_id = f"ord-{next(ids)}"
            orders[order_id] = (sku, ref)
            inner = (f"<o:PlaceOrderResponse><o:OrderId>{order_id}</o:OrderId>"
                     f"<o:Ref>{ref}</o:Ref></o:PlaceOrderResponse>")  # fmt: skip
        else:
            order_id = root.findtext(".//o:OrderId", namespaces=NS) or ""
            if order_id not in orders:
                fault = (
                    "<soap:Fault><faultcode>soap:Client</faultcode>"
                    f"<faultstring>no order {order_id}</faultstring></soap:Fault>"
                )
                return web.Response(status=500, text=ENVELOPE.format(fault),
                                    content_type="text/xml")  # fmt: skip
            sku, _ = orders[order_id]
            inner = (
                "<o:GetOrderStatusResponse><o:Status>accepted</o:Status>"
                f'<o:Lines><o:Line sku="{sku}" qty="1"/></o:Lines></o:GetOrderStatusResponse>'
            )
        return web.Response(text=ENVELOPE.format(inner), content_type="text/xml")

    app.router.add_post("/soap/orders", endpoint)
    return app


@pytest.fixture
async def soap() -> AsyncIterator[TestServer]:
    server = await serve(soap_service())
    yield server
    await server.close()


def example(base_url: str) -> str:
    return EXAMPLE.read_text().replace("http://127.0.0.1:8000", base_url)


async def test_the_soap_example_passes_against_a_soap_service(
    soap: TestServer, load_flows: Callable[[str], Config]
) -> None:
    result = await run_flow(load_flows(example(f"http://127.0.0.1:{soap.port}")))
    assert [(s.name, s.status, s.message) for s in result.steps] == [
        ("place_order", "passed", None),
        ("order_status", "passed", None),
    ]


async def test_a_soap_fault_fails_the_step_with_what_came(
    soap: TestServer, load_flows: Callable[[str], Config]
) -> None:
    text = example(f"http://127.0.0.1:{soap.port}").replace(
        "{{ steps.place_order.order_id | e }}", "ord-missing"
    )
    ok = "        expect:\n          status: 200\n          namespaces: *ns\n"
    text = text.replace(ok, ok.replace("200", "500"))
    result = await run_flow(load_flows(text))
    step = result.steps[1]
    assert (step.reason, step.message) == (
        "assertion",
        "//o:GetOrderStatusResponse/o:Status missing, want 'accepted'",
    )


def xml_target(body: bytes, hits: list[str]) -> web.Application:
    app = web.Application()

    async def doc(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/xml")

    async def external(request: web.Request) -> web.Response:
        hits.append(request.path)  # an external entity fetched: must never happen
        return web.Response(text="fetched")

    app.router.add_get("/doc", doc)
    app.router.add_get("/external", external)
    return app


LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<r><v>&lol3;</v></r>"""


@pytest.mark.parametrize("attack", ["laughs", "file", "network"])
async def test_hostile_xml_is_refused_and_fetches_nothing(
    load_flows: Callable[[str], Config], tmp_path: Path, attack: str, port: Callable[[], int]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    hits: list[str] = []
    listening = port()
    bodies = {
        "laughs": LAUGHS,
        "file": f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]>'
        "<r><v>&x;</v></r>".encode(),
        "network": f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM '
        f'"http://127.0.0.1:{listening}/external">]><r><v>&x;</v></r>'.encode(),
    }
    app = xml_target(bodies[attack], hits)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", listening).start()
    url = f"http://127.0.0.1:{listening}/doc"
    head = "flows:\n  - name: f\n    timeout: 5s\n    variants: {stable: {}}\n    steps:\n"
    step = f'      - {{name: s, kind: http, url: "{url}", '
    checks = head + step + "expect: {xpath: {//v: x}}}\n"
    takes = head + step + "extract: {v: {xpath: //v}}}\n"
    try:
        first = await run_flow(load_flows(checks))
        second = await run_flow(load_flows(takes))
    finally:
        await runner.cleanup()
    refused = "body declares XML entities: refused (entity expansion, XXE)"
    assert (first.steps[0].reason, first.steps[0].message) == ("assertion", f"{refused}, want XML")
    assert (second.steps[0].reason, second.steps[0].message) == (
        "extract",
        f"v: {refused}, want //v",
    )
    assert hits == []
    assert "TOP-SECRET-VALUE" not in str(first.to_dict()) + str(second.to_dict())


@pytest.mark.parametrize(
    ("xpath", "message"),
    [
        ("//o:Status", "bad XPath '//o:Status': Undefined namespace prefix"),
        ("//[", "bad XPath '//[': Invalid expression"),
    ],
)
def test_bad_xpaths_are_refused_when_the_flow_loads(
    load_flows: Callable[[str], Config], xpath: str, message: str
) -> None:
    from probes.errors import ConfigError

    flows = (
        "flows:\n  - name: f\n    steps:\n      - name: s\n        kind: http\n"
        f"        url: http://127.0.0.1:1/\n        expect: {{xpath: {{'{xpath}': 1}}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_flows(flows)
    assert caught.value.problems[0].endswith(f"expect: {message}")


def callback_sender(listener: str, body: str) -> web.Application:
    """A service that answers at once and then calls back with an XML (SOAP) notification,
    echoing the synthetic-traffic marker as senders echo a correlation header."""
    app = web.Application()
    tasks: set[asyncio.Task[None]] = set()

    async def order(request: web.Request) -> web.Response:
        marker = request.headers["X-Hopwatch-Run"]

        async def call_back() -> None:
            async with aiohttp.ClientSession() as session:
                await session.post(
                    f"http://{listener}/hooks/soap",
                    data=body.replace("RUN", marker).encode(),
                    headers={"Content-Type": "text/xml; charset=utf-8",
                             "X-Hopwatch-Run": marker},
                )  # fmt: skip

        task = asyncio.create_task(call_back())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return web.json_response({"accepted": True}, status=202)

    app.router.add_post("/orders", order)
    return app


NOTIFICATION = ENVELOPE.format(
    "<o:OrderShipped><o:Run>RUN</o:Run><o:Carrier>DHL</o:Carrier></o:OrderShipped>"
)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (NOTIFICATION, "passed", None),
        ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x "y">]><r>&x;RUN</r>', "failed",
         # refused at the listener, which the waiting step names (not a sender that never sent)
         "nothing accepted on /hooks/soap by the deadline: 1 delivery refused (1 XML refused)"),
    ],
    ids=["soap", "entities"],
)  # fmt: skip
async def test_webhook_await_takes_xml_callbacks_and_checks_them_by_xpath(
    load_flows: Callable[[str], Config],
    port: Callable[[], int],
    body: str,
    status: str,
    message: str | None,
) -> None:
    listener = f"127.0.0.1:{port()}"
    sender = await serve(callback_sender(listener, body))
    steps = f"""\
      - name: order
        kind: http
        method: POST
        url: "http://127.0.0.1:{sender.port}/orders"
      - name: shipped
        kind: webhook_await
        path: /hooks/soap
        within: 1s
        expect:
          namespaces: &ns {{o: "{ORDERS}"}}
          xpath: {{"//o:Run": "{{{{ run.id }}}}"}}
        extract:
          carrier: {{xpath: "//o:OrderShipped/o:Carrier", namespaces: *ns}}
"""
    flows = "flows:\n  - name: f\n    timeout: 5s\n    variants: {stable: {}}\n    steps:\n"
    engine = Engine(load_flows(flows + steps), Options(listen=listener, admin_listen="127.0.0.1:0"),
                    CollectorRegistry())  # fmt: skip
    await engine.start(schedule=False, admin=False)
    try:
        [result] = await engine.run_once(engine.select())
    finally:
        await engine.stop()
        await sender.close()
    shipped = result.steps[1]
    assert shipped.status == status
    assert shipped.message == message or (message and shipped.message.startswith(message))
    if status == "passed":
        assert (
            engine.registry.get_sample_value(
                "hopwatch_arrivals_total", {"source": "webhook", "outcome": "matched"}
            )
            == 1
        )
    else:
        assert (
            engine.registry.get_sample_value(
                "hopwatch_arrivals_total", {"source": "webhook", "outcome": "malformed"}
            )
            == 1
        )


def soap_notifier(listener: str, statuses: list[int]) -> web.Application:
    """A SOAP service that takes an order and then notifies three times, without any hopwatch
    header: a hostile document, a notification of someone else's order, and this order's, whose
    `o:Ref` is the reference it was given. `statuses` holds the listener's answers."""
    app = web.Application()
    tasks: set[asyncio.Task[None]] = set()

    async def order(request: web.Request) -> web.Response:
        ref = (await request.json())["ref"]

        async def notify() -> None:
            shipped = "<o:OrderShipped><o:Ref>{}</o:Ref><o:Carrier>{}</o:Carrier></o:OrderShipped>"
            async with aiohttp.ClientSession() as session:
                for body in (LAUGHS.decode(), ENVELOPE.format(shipped.format("other-7", "UPS")),
                             ENVELOPE.format(shipped.format(ref, "DHL"))):  # fmt: skip
                    async with session.post(
                        f"http://{listener}/hooks/soap",
                        data=body.encode(),
                        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
                    ) as answer:
                        statuses.append(answer.status)

        task = asyncio.create_task(notify())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return web.json_response({"accepted": True}, status=202)

    app.router.add_post("/orders", order)
    return app


async def test_webhook_await_matches_an_xml_delivery_to_its_run_by_xpath(
    load_flows: Callable[[str], Config], port: Callable[[], int]
) -> None:
    listener = f"127.0.0.1:{port()}"
    statuses: list[int] = []
    sender = await serve(soap_notifier(listener, statuses))
    steps = f"""\
      - name: order
        kind: http
        method: POST
        url: "http://127.0.0.1:{sender.port}/orders"
        json: {{ref: "{{{{ run.correlation }}}}"}}
      - name: shipped
        kind: webhook_await
        path: /hooks/soap
        within: 2s
        match:
          namespaces: {{o: "{ORDERS}", s: "{SOAP}"}}
          xpath: {{"/s:Envelope/s:Body/o:OrderShipped/o:Ref": "{{{{ run.correlation }}}}"}}
        expect:  # this run's notification (DHL), not the other's (UPS)
          namespaces: {{o: "{ORDERS}"}}
          xpath: {{"//o:Carrier": DHL}}
"""
    flows = "flows:\n  - name: f\n    timeout: 5s\n    variants: {stable: {}}\n    steps:\n"
    engine = Engine(load_flows(flows + steps), Options(listen=listener, admin_listen="127.0.0.1:0"),
                    CollectorRegistry())  # fmt: skip
    await engine.start(schedule=False, admin=False)
    try:
        [result] = await engine.run_once(engine.select())
    finally:
        await engine.stop()
        await sender.close()
    shipped = result.steps[1]
    assert (shipped.status, shipped.message) == ("passed", None)
    assert statuses == [400, 202, 202]

    def arrivals(outcome: str) -> float | None:
        labels = {"source": "webhook", "outcome": outcome}
        return engine.registry.get_sample_value("hopwatch_arrivals_total", labels)

    assert (arrivals("matched"), arrivals("unmatched"), arrivals("malformed")) == (1, 1, 1)


async def test_an_xml_delivery_that_carries_the_run_but_fails_the_rest_is_said(
    load_flows: Callable[[str], Config], port: Callable[[], int]
) -> None:
    """The run's reference is in the delivery but another XPath of the rule is not: the step
    names what the delivery held instead (a close match), not `not_received`."""
    listener = f"127.0.0.1:{port()}"
    statuses: list[int] = []
    sender = await serve(soap_notifier(listener, statuses))
    steps = f"""\
      - name: order
        kind: http
        method: POST
        url: "http://127.0.0.1:{sender.port}/orders"
        json: {{ref: "{{{{ run.correlation }}}}"}}
      - name: shipped
        kind: webhook_await
        path: /hooks/soap
        within: 1s
        match:
          namespaces: {{o: "{ORDERS}"}}
          xpath: {{"//o:Ref": "{{{{ run.correlation }}}}", "//o:Carrier": FedEx}}
"""
    flows = "flows:\n  - name: f\n    timeout: 5s\n    variants: {stable: {}}\n    steps:\n"
    engine = Engine(load_flows(flows + steps), Options(listen=listener, admin_listen="127.0.0.1:0"),
                    CollectorRegistry())  # fmt: skip
    await engine.start(schedule=False, admin=False)
    try:
        [result] = await engine.run_once(engine.select())
    finally:
        await engine.stop()
        await sender.close()
    shipped = result.steps[1]
    assert shipped.reason == "assertion", shipped.message
    assert shipped.message is not None and "//o:Carrier 'DHL', want 'FedEx'" in shipped.message
