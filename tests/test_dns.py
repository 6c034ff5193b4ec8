"""The dns kind against a tiny authoritative server on loopback, over UDP and TCP."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from monitor.config import Config
from probes.dns import split_server
from tests.fixtures.dns_server import DnsServer
from tests.test_http import run_flow


def flow(step: str) -> str:
    return (
        "flows:\n  - name: f\n    timeout: 5s\n    variants: {stable: {host: api}}\n    steps:\n"
        f"      - name: s\n        kind: dns\n{step}"
    )


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_answers_checked_and_handed_on(
    dns_server: DnsServer, load_flows: Callable[[str], Config], transport: str
) -> None:
    step = f"""\
        query_name: "{{{{ variant.host }}}}.test"
        server: "{dns_server.address}"
        transport: {transport}
        expect:
          answers: [127.0.0.11, 127.0.0.10]
          answers_match: "^api\\\\.test\\\\. 300 IN A 127\\\\.0\\\\.0\\\\.1[01]$"
          min_answers: 2
"""
    result = await run_flow(load_flows(flow(step)))
    [s] = result.steps
    assert (s.status, s.message) == ("passed", None)
    assert s.attributes == {"dns.response.code": "NOERROR", "dns.answers": 2}
    assert dns_server.questions == [("api.test.", "A", transport)]


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("query_name: nope.test", "rcode NXDOMAIN, want NOERROR"),
        ("query_name: api.test\n        query_type: MX\n        expect: {min_answers: 1}",
         "0 answers, want at least 1"),
        ("query_name: mail.test\n        query_type: MX\n        expect: {answers: [10 mx1.test.]}",
         "answers ['10 mx1.test.', '20 mx2.test.'], want ['10 mx1.test.']"),
        ("query_name: api.test\n        query_type: TXT\n        expect: {answers_match: spf2}",
         "answer 'api.test. 300 IN TXT \"v=spf1 -all\"' does not match /spf2/"),
        ("query_name: big.test\n        query_type: TXT",
         "the answer from {server}/udp is truncated: ask over tcp"),
    ],
)  # fmt: skip
async def test_wrong_answers_say_what_came_and_what_was_wanted(
    dns_server: DnsServer, load_flows: Callable[[str], Config], step: str, message: str
) -> None:
    config = f'        {step}\n        server: "{dns_server.address}"\n'
    [s] = (await run_flow(load_flows(flow(config)))).steps
    assert (s.status, s.reason, s.message) == (
        "failed",
        "assertion",
        message.format(server=dns_server.address),
    )


async def test_nxdomain_may_be_what_is_wanted_and_big_answers_come_over_tcp(
    dns_server: DnsServer, load_flows: Callable[[str], Config]
) -> None:
    steps = f"""\
        query_name: gone.test
        server: "{dns_server.address}"
        expect: {{rcode: NXDOMAIN}}
      - name: big
        kind: dns
        query_name: big.test
        query_type: TXT
        transport: tcp
        server: "{dns_server.address}"
        expect: {{min_answers: 4}}
"""
    result = await run_flow(load_flows(flow(steps)))
    assert [(s.status, s.message) for s in result.steps] == [("passed", None)] * 2


async def test_a_server_that_stays_silent_times_out(
    dns_server: DnsServer, load_flows: Callable[[str], Config]
) -> None:
    config = f'        query_name: silent.test\n        server: "{dns_server.address}"\n'
    config += "        timeout: 300ms\n"
    [s] = (await run_flow(load_flows(flow(config)))).steps
    assert s.reason == "timeout"


async def test_nothing_listening_over_tcp_is_a_connect_error(
    load_flows: Callable[[str], Config], port: Callable[[], int]
) -> None:
    free = port()
    config = f'        query_name: api.test\n        server: "127.0.0.1:{free}"\n'
    config += "        transport: tcp\n"
    [s] = (await run_flow(load_flows(flow(config)))).steps
    assert (s.reason, s.message) == ("connect_error", f"127.0.0.1:{free}/tcp: Connection refused")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("ns1.example.com", ("ns1.example.com", 53)),
    ],
)
def test_server_addresses(text: str, want: tuple[str, int]) -> None:
    assert split_server(text) == want


def test_span_is_a_client_span_naming_the_question_and_the_server() -> None:
    from monitor.templates import Templates
    from probes import KINDS
    from probes.dns import Config as DnsConfig
    from tests.test_tracing import make_context

    config = DnsConfig(name="s", kind="dns", query_name="{{ run.flow }}.test", query_type="MX",
                       server="127.0.0.1:5353", transport="tcp")  # fmt: skip
    shape = KINDS["dns"].span_shape(config, make_context(Templates()))
    assert (shape.name, shape.kind) == ("DNS MX orders.test", "client")
    assert shape.attributes == {
        "dns.question.name": "orders.test",
        "dns.question.type": "MX",
        "network.transport": "tcp",
        "server.address": "127.0.0.1",
        "server.port": 5353,
    }


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_server_given_by_name_is_resolved(
    dns_server: DnsServer, load_flows: Callable[[str], Config], transport: str
) -> None:
    """As `dig @name` and blackbox_exporter do; it used to end the step in a ValueError."""
    config = (
        f'        query_name: api.test\n        server: "localhost:{dns_server.port}"\n'
        f"        transport: {transport}\n        expect: {{min_answers: 2}}\n"
    )
    [s] = (await run_flow(load_flows(flow(config)))).steps
    assert (s.status, s.message) == ("passed", None)
    assert dns_server.questions == [("api.test.", "A", transport)]


async def test_a_server_name_that_does_not_resolve_is_a_dns_error(
    load_flows: Callable[[str], Config],
) -> None:
    config = '        query_name: api.test\n        server: "ns.nowhere.invalid:53"\n'
    [s] = (await run_flow(load_flows(flow(config)))).steps
    assert s.reason == "dns_error"
    assert s.message is not None
    assert s.message.startswith("cannot resolve the server ns.nowhere.invalid: ")


async def test_a_templated_server_that_renders_malformed_is_said(
    load_flows: Callable[[str], Config],
) -> None:
    config = '        query_name: api.test\n        server: "{{ variant.host }}:x"\n'
    [s] = (await run_flow(load_flows(flow(config)))).steps
    assert (s.reason, s.message) == ("error", "server: want HOST or HOST:PORT, got 'api:x'")
