"""Untrusted values and secrets against real servers: a `..` taken from a response never climbs
the path the target sees; a webhook signing secret a target echoes never reaches a result; an
empty admin token is refused off loopback like a missing one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.demo.broker import free_port
from monitor.engine import Engine, Options
from monitor.results import RunResult
from tests.fixtures.core import serve
from tests.test_http import run_flow

SEEN = web.AppKey("seen", list[str])
WHSEC = "whsec_c2lnbmluZy1zZWNyZXQtdGhhdC1tdXN0LXN0YXk="


def echo_app() -> web.Application:
    """Answers values to extract, records every path it is asked for, echoes a secret."""
    app = web.Application()
    app[SEEN] = []

    async def values(request: web.Request) -> web.Response:
        return web.json_response({"dots": "..", "dot": ".", "fine": "a..b"})

    async def anything(request: web.Request) -> web.Response:
        request.app[SEEN].append(request.raw_path)
        return web.json_response({"path": request.raw_path})

    async def leaky(request: web.Request) -> web.Response:
        text = f"signature config rejected: secret {WHSEC} key {WHSEC.removeprefix('whsec_')}"
        return web.Response(status=500, text=text)

    app.router.add_get("/values", values)
    app.router.add_get("/leaky", leaky)
    app.router.add_get("/{tail:.*}", anything)
    return app


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    server = await serve(echo_app())
    yield server
    await server.close()


async def run_once(config: Config, options: Options | None = None) -> RunResult:
    # Its own listen port: flows here may wait on webhooks, and 8080 may be taken.
    return await run_flow(config, options=options or Options(listen=f"127.0.0.1:{free_port()}"))


def flow(base: str, steps: str) -> str:
    return (
        "flows:\n  - name: f\n    timeout: 5s\n"
        f"    variants: {{stable: {{base_url: '{base}'}}}}\n    steps:\n{steps}"
    )


@pytest.mark.parametrize(("name", "refused"), [("dots", True), ("dot", True), ("fine", False)])
async def test_dot_segments_from_a_response_never_climb_the_path(
    target: TestServer, load_flows: Callable[[str], Config], name: str, refused: bool
) -> None:
    steps = f"""\
      - name: src
        kind: http
        url: "{{{{ variant.base_url }}}}/values"
        extract: {{v: {{json: "$.{name}"}}}}
      - name: use
        kind: http
        url: "{{{{ variant.base_url }}}}/sink/{name}/{{{{ steps.src.v }}}}/end"
"""
    base = f"http://127.0.0.1:{target.port}"
    result = await run_once(load_flows(flow(base, steps)))
    seen = target.app[SEEN]
    if refused:
        assert result.steps[1].reason == "extract", result.steps[1]
        assert "dot segment" in (result.steps[1].message or "")
        assert seen == []  # nothing was sent, least of all /sink/end
    else:
        assert result.steps[1].reason is None, result.steps[1]
        assert seen == ["/sink/fine/a..b/end"]


async def test_a_webhook_signing_secret_echoed_by_a_target_is_masked(
    target: TestServer, load_flows: Callable[[str], Config]
) -> None:
    steps = f"""\
      - name: call
        kind: http
        url: "{{{{ variant.base_url }}}}/leaky"
      - name: hook
        kind: webhook_await
        path: /hooks/in
        signature: {{scheme: standard_webhooks, secret: "{WHSEC}"}}
        within: 1s
"""
    base = f"http://127.0.0.1:{target.port}"
    result = await run_once(load_flows(flow(base, steps)))
    dumped = json.dumps(result.to_dict())
    assert result.steps[0].reason == "http_status", result.steps[0]
    assert "signature config rejected" in dumped  # the excerpt is there, masked
    assert WHSEC not in dumped
    assert WHSEC.removeprefix("whsec_") not in dumped


@pytest.mark.parametrize("token", ["", "  "])
async def test_an_empty_admin_token_is_refused_off_loopback(
    load_flows: Callable[[str], Config], token: str
) -> None:
    steps = "      - {name: s, kind: http, url: 'http://127.0.0.1:1/'}\n"
    engine = Engine(
        load_flows(flow("x", steps)),
        Options(admin_listen=f"0.0.0.0:{free_port()}", admin_token=token),
        CollectorRegistry(),
    )
    try:
        with pytest.raises(ValueError, match="not loopback: give --admin-token"):
            await engine.start(schedule=False)
    finally:
        await engine.stop()
