"""The tcp kind against a line-based server on loopback (plain, TLS and STARTTLS), and the TLS
expiry metric and `tls_valid_for` assertion of the tcp and http kinds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from monitor.config import Config
from tests.fixtures.core import free_port
from tests.fixtures.tls import ShortCert
from tests.test_http import run_flow, target_app

EXPIRY = "hopwatch_tls_cert_expiry_timestamp_seconds"
LABELS = {"flow": "f", "step": "s", "variant": "stable", "location": "local"}


@dataclass
class LineServer:
    port: int
    heard: list[str]


async def _serve_lines(
    tls: ShortCert | None, starttls: bool, greeting: bytes = b"220 ready id=srv-7\r\n"
) -> tuple[asyncio.Server, LineServer]:
    """A tiny SMTP-like server: greets with an id, answers EHLO, echoes ECHO, upgrades on
    STARTTLS."""
    heard: list[str] = []

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(greeting)
            while line := (await reader.readline()).decode().strip():
                heard.append(line)
                if line.startswith("ECHO "):
                    writer.write(f"250 echo {line[5:]}\r\n".encode())
                elif line.startswith("EHLO"):
                    writer.write(b"250-hello\r\n250 STARTTLS\r\n")
                elif line == "STARTTLS" and starttls and tls is not None:
                    writer.write(b"220 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(tls.server)
                elif line == "QUIT":
                    writer.write(b"221 bye\r\n")
                    break
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client left mid-conversation: a test about that
        finally:
            writer.close()

    server = await asyncio.start_server(
        talk, "127.0.0.1", 0, ssl=tls.server if tls is not None and not starttls else None
    )
    port = server.sockets[0].getsockname()[1]
    return server, LineServer(port, heard)


@pytest.fixture
async def plain() -> AsyncIterator[LineServer]:
    server, lines = await _serve_lines(None, starttls=False)
    async with server:
        yield lines


def flow(step: str) -> str:
    return (
        "flows:\n  - name: f\n    timeout: 5s\n    variants: {stable: {}}\n    steps:\n"
        f"      - name: s\n        kind: tcp\n{step}"
    )


CONVERSATION = """\
        query_response:
          - expect: "^220 ready id=(?P<server_id>\\\\S+)"
          - send: "EHLO hopwatch-{{ run.id }}\\r\\n"
          - expect: "^250 "
          - send: "QUIT\\r\\n"
          - expect: "^221"
"""


async def test_conversation_passes_and_named_groups_are_extracted(
    plain: LineServer, load_flows: Callable[[str], Config]
) -> None:
    result = await run_flow(
        load_flows(flow(f"        address: 127.0.0.1:{plain.port}\n{CONVERSATION}"))
    )
    [step] = result.steps
    assert (step.status, step.message) == ("passed", None)
    assert set(step.phases) == {"dns", "connect"}
    assert plain.heard == [f"EHLO hopwatch-{result.run_id}", "QUIT"]


async def test_a_line_that_never_comes_is_an_assertion_with_the_last_line(
    plain: LineServer, load_flows: Callable[[str], Config]
) -> None:
    step = f"""\
        address: 127.0.0.1:{plain.port}
        query_response:
          - send: "QUIT\\r\\n"
          - expect: "^250 "
"""
    [result] = (await run_flow(load_flows(flow(step)))).steps
    assert (result.reason, result.message) == (
        "assertion",
        "connection closed before a line matched /^250 /; last line '221 bye'",
    )


async def test_nothing_listening_is_a_connect_error(load_flows: Callable[[str], Config]) -> None:
    port = free_port()
    [step] = (await run_flow(load_flows(flow(f"        address: 127.0.0.1:{port}\n")))).steps
    assert step.reason == "connect_error"
    assert step.message == f"cannot connect to 127.0.0.1:{port}: Connection refused"


@pytest.mark.parametrize("starttls", [False, True], ids=["tls", "starttls"])
async def test_tls_expiry_is_exported_and_asserted(
    short_cert: ShortCert, load_flows: Callable[[str], Config], starttls: bool
) -> None:
    server, lines = await _serve_lines(short_cert, starttls=starttls)
    tls = f"tls: {{ca_file: '{short_cert.ca_file}'}}"
    if starttls:
        moves = """\
          - expect: "^220 "
          - send: "STARTTLS\\r\\n"
          - expect: "^220 go"
          - starttls: true
          - send: "QUIT\\r\\n"
          - expect: "^221"
"""
        config = (
            f"        address: 127.0.0.1:{lines.port}\n        server_name: localhost\n"
            f"        {tls}\n        query_response:\n{moves}"
        )
    else:
        config = f"        address: 127.0.0.1:{lines.port}\n        {tls}\n"
    async with server:
        registry = CollectorRegistry()
        good = await run_flow(load_flows(flow(config + "        expect: {tls_valid_for: 2d}\n")),
                              registry)  # fmt: skip
        bad = await run_flow(load_flows(flow(config + "        expect: {tls_valid_for: 14d}\n")))
    want = short_cert.not_after.timestamp()
    assert (good.steps[0].status, good.steps[0].message) == ("passed", None)
    assert good.steps[0].tls_not_after == want
    assert registry.get_sample_value(EXPIRY, LABELS) == want
    assert "tls" in good.steps[0].phases
    [step] = bad.steps
    assert step.reason == "assertion" and step.tls_not_after == want
    assert step.message is not None and step.message.startswith("certificate expires in 3.0d (")
    assert step.message.endswith("), want valid for 14.0d")


async def test_an_untrusted_certificate_is_a_tls_error(
    short_cert: ShortCert, load_flows: Callable[[str], Config]
) -> None:
    server, lines = await _serve_lines(short_cert, starttls=False)
    async with server:
        config = f"        address: 127.0.0.1:{lines.port}\n        tls: {{}}\n"
        [step] = (await run_flow(load_flows(flow(config)))).steps
    assert step.reason == "tls_error"
    assert step.message is not None and "CERTIFICATE_VERIFY_FAILED" in step.message


async def test_http_exports_the_expiry_and_asserts_it_even_unverified(
    short_cert: ShortCert, load_flows: Callable[[str], Config]
) -> None:
    runner = web.AppRunner(target_app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=short_cert.server).start()
    url = f"https://127.0.0.1:{port}/json"
    registry = CollectorRegistry()

    def http_flow(tls: str, valid_for: str) -> str:
        return (
            "flows:\n  - name: f\n    timeout: 5s\n    variants: {stable: {}}\n    steps:\n"
            f"      - {{name: s, kind: http, url: '{url}', tls: {tls},"
            f" expect: {{tls_valid_for: {valid_for}}}}}\n"
        )

    try:
        good = await run_flow(load_flows(http_flow(f"{{ca_file: '{short_cert.ca_file}'}}", "1d")),
                              registry)  # fmt: skip
        bad = await run_flow(load_flows(http_flow("{verify: false}", "30d")))
    finally:
        await runner.cleanup()
    want = short_cert.not_after.timestamp()
    assert (good.steps[0].status, good.steps[0].message) == ("passed", None)
    assert good.steps[0].tls_not_after == want
    assert registry.get_sample_value(EXPIRY, LABELS) == want
    assert (bad.steps[0].reason, bad.steps[0].tls_not_after) == ("assertion", want)
    assert bad.steps[0].message is not None and "want valid for 30.0d" in bad.steps[0].message


def test_span_is_a_client_connect_span_with_the_network_attributes() -> None:
    from monitor.templates import Templates
    from probes import KINDS
    from probes.tcp import Config as TcpConfig
    from tests.test_tracing import make_context

    config = TcpConfig(name="s", kind="tcp", address="{{ run.flow }}.internal:25")
    shape = KINDS["tcp"].span_shape(config, make_context(Templates()))
    assert (shape.name, shape.kind) == ("connect orders.internal:25", "client")
    assert shape.attributes == {
        "network.transport": "tcp",
        "server.address": "orders.internal",
        "server.port": 25,
    }


async def test_a_send_reuses_the_groups_of_the_expect_before_it(
    load_flows: Callable[[str], Config],
) -> None:
    """`${1}` and `${name}` as blackbox's query_response has them; `$${1}` stays literal, the
    step's own template is rendered, and a server's text is never read as a template."""
    server, lines = await _serve_lines(None, False, b"220 ready id={{run.id}}x\r\n")
    step = f"""\
        address: 127.0.0.1:{lines.port}
        query_response:
          - expect: "^220 ready id=(?P<server_id>\\\\S+)"
          - send: "ECHO ${{server_id}}/${{1}}/$${{1}}/{{{{ run.id }}}}\\r\\n"
          - expect: "^250 echo (\\\\S+)"
          - send: "ECHO again ${{1}}\\r\\n"
          - expect: "^250 echo again"
          - send: "QUIT\\r\\n"
          - expect: "^221"
"""
    async with server:
        result = await run_flow(load_flows(flow(step)))
    [s] = result.steps
    assert (s.status, s.message) == ("passed", None)
    first = f"{{{{run.id}}}}x/{{{{run.id}}}}x/${{1}}/{result.run_id}"
    assert lines.heard == [f"ECHO {first}", f"ECHO again {first}", "QUIT"]


async def test_a_group_holding_a_line_break_is_not_sent(
    load_flows: Callable[[str], Config],
) -> None:
    server, lines = await _serve_lines(None, False, b"220 ready id=a\rQUIT\r\n")
    step = f"""\
        address: 127.0.0.1:{lines.port}
        query_response:
          - expect: "^220 ready id=(.*)$"
          - send: "ECHO ${{1}}\\r\\n"
"""
    async with server:
        [s] = (await run_flow(load_flows(flow(step)))).steps
    assert (s.reason, s.message) == (
        "assertion", "group 1 of the answer holds a line break: not sent")  # fmt: skip
    assert lines.heard == []


@pytest.mark.parametrize(
    ("moves", "problem"),
    [
        ('[{send: "A ${1}"}]', "query_response entry 1: send uses ${1} but no expect comes "
         "before it"),
        ('[{expect: "^(a)"}, {send: "A ${2}"}]', "query_response entry 2: send uses ${2} but "
         "the expect before it, /^(a)/, has 1 group"),
        ('[{expect: "^(?P<x>a)"}, {send: "A ${y}"}]', "query_response entry 2: send uses ${y} "
         "but the expect before it, /^(?P<x>a)/, has no group named 'y'"),
        ('[{expect: "^(a)"}, {send: "A {{ ${1} }}"}]', "query_response entry 2: send uses a "
         "group inside a {{ … }} template"),
    ],
)  # fmt: skip
def test_groups_a_send_cannot_have_are_refused_when_the_flow_loads(
    load_flows: Callable[[str], Config], moves: str, problem: str
) -> None:
    from probes.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_flows(flow(f"        address: 127.0.0.1:25\n        query_response: {moves}\n"))
    assert caught.value.problems[0].endswith(problem), caught.value.problems
