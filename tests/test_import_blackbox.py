"""`hopwatch import blackbox` on blackbox_exporter's own example and default configurations:
the http, tcp, dns and grpc modules' flows run with `hopwatch check` against local servers,
decided as blackbox would; every other module and option listed."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.fixtures.core import serve
from tests.fixtures.dns_server import DnsServer
from tests.fixtures.grpc_server import GrpcServer
from tests.fixtures.line_servers import LineServers
from tests.fixtures.tls import ShortCert
from tests.test_import_postman import command

DATA = Path(__file__).parent / "imports" / "blackbox"
PASSWORD_ENV = "BLACKBOX_HTTP_BASIC_AUTH_EXAMPLE_PASSWORD"
PAGE = "<h1>Project</h1><a href='/dl'>Download the latest version here</a>"


def site() -> web.Application:
    """The pages and API the example modules probe (blackbox's example's own wording)."""

    async def page(request: web.Request) -> web.Response:
        text = PAGE if request.path == "/" else "Could not connect to database. " + PAGE
        return web.Response(text=text, content_type="text/html",
                            headers={"Access-Control-Allow-Origin": "*"})  # fmt: skip

    async def api(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization")
        want = "Basic " + base64.b64encode(b"username:mysecret").decode()
        if header is not None and header != want:
            return web.Response(status=401)
        return web.json_response({"ok": True, "host": request.headers.get("Host")})

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/broken", page)
    app.router.add_post("/api", api)
    return app


@pytest.fixture
async def target() -> TestServer:
    server = await serve(site())
    yield server  # type: ignore[misc]
    await server.close()


HOSTS = ("DNS_HOST", "IMAP_HOST", "SMTP_HOST", "IRC_HOST", "AMQPS_HOST", "PG_HOST")
HTTP_FLOWS = ["website", "api_http_post_2xx", "api_http_basic_auth_example", "oauth"]


async def imported(
    target: TestServer, tmp_path: Path, hosts: dict[str, str] | None = None,
    config: Path = DATA / "example.yml",
) -> tuple[Path, str]:  # fmt: skip
    """The example imported with the scrape jobs' placeholders replaced by `hosts` (the discard
    port where a test starts no server for them)."""
    text = (DATA / "prometheus.yml").read_text().replace("TARGET_HOST", f"127.0.0.1:{target.port}")
    for placeholder in HOSTS:
        text = text.replace(placeholder, (hosts or {}).get(placeholder, "127.0.0.1:9"))
    prometheus = tmp_path / "prometheus.yml"
    prometheus.write_text(text)
    return await run_import(config, prometheus, tmp_path)


async def run_import(config: Path, prometheus: Path, tmp_path: Path) -> tuple[Path, str]:
    flows = tmp_path / "blackbox.yaml"
    rc, _, err = await command(
        sys.executable, "-m", "monitor", "import",
        "blackbox", str(config), "--prometheus", str(prometheus), "-o", str(flows),
    )  # fmt: skip
    assert rc == 1, err
    return flows, err


Runs = dict[tuple[str, str], dict[str, Any]]


async def check(flows: Path, names: list[str], env: dict[str, str]) -> tuple[int, Runs, str]:
    """`hopwatch check` of the named flows: its exit code, runs by (flow, variant), stderr."""
    selected = [arg for name in names for arg in ("--flow", name)]
    rc, out, err = await command(
        sys.executable, "-m", "monitor", "check", str(flows), *selected, "--output", "json",
        "--listen", "127.0.0.1:0", env=env,
    )  # fmt: skip
    runs = {(r["flow"], r["variant"]): r for r in json.loads(out)["runs"]} if out else {}
    return rc, runs, err


@pytest.mark.parametrize(("password", "auth_outcome"), [("mysecret", "success"),
                                                        ("wrong", "failure")])  # fmt: skip
async def test_http_modules_run_and_decide_as_blackbox(
    target: TestServer, tmp_path: Path, password: str, auth_outcome: str
) -> None:
    flows, _ = await imported(target, tmp_path)
    rc, runs, err = await check(flows, HTTP_FLOWS, {PASSWORD_ENV: password})
    assert rc == 1, err  # /broken fails its body check in every case
    base = f"http://127.0.0.1:{target.port}"
    assert {k: r["outcome"] for k, r in runs.items()} == {
        ("website", f"{base}/"): "success",
        ("website", f"{base}/broken"): "failure",
        ("api_http_post_2xx", f"127.0.0.1:{target.port}/api"): "success",
        ("api_http_basic_auth_example", f"127.0.0.1:{target.port}/api"): auth_outcome,
        ("oauth", f"{base}/"): "success",
    }
    broken = runs[("website", f"{base}/broken")]
    assert broken["reason"] == "assertion"
    assert "Could not connect to database" in broken["steps"][0]["message"]
    if auth_outcome == "failure":
        assert runs[("api_http_basic_auth_example", f"127.0.0.1:{target.port}/api")][
            "reason"] == "http_status"  # fmt: skip


async def test_everything_left_out_is_listed(target: TestServer, tmp_path: Path) -> None:
    flows, err = await imported(target, tmp_path)
    text = flows.read_text()
    assert "24 items not translated: the import is incomplete" in err
    assert "not yet supported" not in err
    for line in (
        "module 'postgresql': query_response entry 1 (and the 2 after it) is not translated: "
        "send of binary data (the step sends text)",
        "module 'dns_udp_example': validate_answer_rrs.fail_if_all_match_regexp is not "
        "translated (it fails when every record matches; the step checks each record alone)",
        "module 'dns_udp_example': validate_answer_rrs.fail_if_none_matches_regexp is not",
        "module 'dns_udp_example': validate_authority_rrs is not translated (the step checks "
        "the answer section)",
        "module 'dns_udp_example': validate_additional_rrs is not translated",
        "module 'dns_tcp_example': preferred_ip_protocol/ip_protocol_fallback are not translated",
        "module 'unix_socket_ping': prober unix is not supported",
        "module 'websocket_example_basic_auth': prober websocket is not supported",
        "module 'icmp_example': prober icmp is not supported",
        "module 'http_2xx_oauth_client_credentials': option oauth2 is not translated",
        "fail_if_header_matches on Set-Cookie with allow_missing (a header that may be absent)",
        "job 'kubernetes-services': targets from kubernetes_sd_configs are not read",
        "module 'http_gzip': no scrape job uses it",
    ):
        assert line in err and line in text
    assert "mysecret" not in text and f"export {PASSWORD_ENV}" in err
    assert "interval: 90s" in text  # the api job's 1m30s
    assert '- send: "EHLO prober\\r\\n"' in text  # a line to send, written on one line


async def test_without_prometheus_every_http_module_waits_for_a_target(tmp_path: Path) -> None:
    rc, out, err = await command(sys.executable, "-m", "monitor", "import",
                                 "blackbox", str(DATA / "example.yml"))  # fmt: skip
    assert rc == 1
    assert "module 'http_post_2xx': no targets without --prometheus" in err
    assert "target: http://TARGET" in out


def test_secrets_in_options_left_out_are_not_shown() -> None:
    from monitor.importers.blackbox import import_blackbox

    module = {"prober": "http", "http": {
        "oauth2": {"client_id": "id", "client_secret": "oauth-secret-1"},
        "proxy_url": "http://user:proxy-pass@proxy:3128",
        "basic_auth": {"username": "u", "password": "basic-pass-1"},
        "body": "token=basic-pass-1",
    }}  # fmt: skip
    result = import_blackbox({"modules": {"m": module}})
    shown = result.to_yaml() + "\n".join(i.line() for i in result.untranslated)
    for secret in ("oauth-secret-1", "proxy-pass", "basic-pass-1"):
        assert secret not in "\n".join(i.line() for i in result.untranslated)
    assert "oauth2 is not translated: {client_id, client_secret}" in shown
    assert "http://***@proxy:3128" in shown


TCP_DNS_FLOWS = {
    "dns_dns_udp_example": "failure",  # its regexes contradict each other on any answer
    "dns_dns_soa": "success",
    "dns_dns_tcp_example": "success",
    "imap": "success",
    "smtp": "success",
    "irc_irc_banner_example": "success",
    "irc_tcp_connect_example": "success",
    "amqps_tls_connect": "success",
    "amqps_rabbitmq": "success",
    "amqps_rabbitmq_insecure": "success",
    "postgresql": "success",  # the connection only: its SSLRequest is listed, not sent
}
CA_PATH = "/etc/blackbox_exporter/CA_cert.crt"  # the example's; the test's own CA stands in


@pytest.mark.parametrize("trusted", [True, False], ids=["ca-trusted", "ca-unknown"])
async def test_tcp_and_dns_modules_run_and_decide_as_blackbox(
    target: TestServer, line_servers: LineServers, dns_server: DnsServer, short_cert: ShortCert,
    tmp_path: Path, trusted: bool,
) -> None:  # fmt: skip
    dns_server.zone[("www.prometheus.io.", "A")] = ["127.0.0.1"]
    dns_server.zone[("prometheus.io.", "SOA")] = ["ns1.prometheus.io. hostmaster.prometheus.io. "
                                                  "2024010101 7200 3600 1209600 300"]  # fmt: skip
    example = tmp_path / "example.yml"
    example.write_text((DATA / "example.yml").read_text().replace(CA_PATH, str(short_cert.ca_file)))
    hosts = {f"{name.upper()}_HOST": line_servers.address(name) for name in line_servers.ports}
    hosts |= {"DNS_HOST": dns_server.address, "PG_HOST": "127.0.0.1:5432"}
    flows, _ = await imported(target, tmp_path, hosts, config=example)
    # Trusting the CA as the machine's own store does, for the modules naming no ca_file.
    env = {"SSL_CERT_FILE": str(short_cert.ca_file)} if trusted else {}
    rc, runs, err = await check(flows, list(TCP_DNS_FLOWS), {PASSWORD_ENV: "x", **env})
    assert rc == 1, err
    want = dict(TCP_DNS_FLOWS)
    if not trusted:  # as blackbox decides with a CA it does not know: the TLS handshake fails
        want |= {"imap": "failure", "smtp": "failure", "amqps_tls_connect": "failure"}
    assert {flow: r["outcome"] for (flow, _), r in runs.items()} == want
    reasons = {flow: r["reason"] for (flow, _), r in runs.items() if r["outcome"] == "failure"}
    assert reasons == {flow: "assertion" if flow.startswith("dns") else "tls_error"
                       for flow, outcome in want.items() if outcome == "failure"}  # fmt: skip
    message = runs[("dns_dns_udp_example", dns_server.address)]["steps"][0]["message"]
    assert message.startswith("answer 'www.prometheus.io. 300 IN A 127.0.0.1' does not match")
    assert ("www.prometheus.io.", "ANY", "tcp") in dns_server.questions  # blackbox's default type
    # PONG with the PING's token: the expect's group, reused by the send as blackbox does
    assert line_servers.heard["irc"] == ["NICK prober", "USER prober prober prober :prober",
                                         "PONG token-42"]  # fmt: skip
    assert line_servers.heard["amqps"] == ["HELO", "", "", ""] * 2  # rabbitmq, rabbitmq_insecure
    if trusted:  # each send ends with the newline blackbox adds
        assert line_servers.heard["smtp"] == ["EHLO prober", "STARTTLS", "EHLO prober", "QUIT"]


async def test_grpc_modules_of_the_default_configuration(
    grpc_server: GrpcServer, grpc_tls_server: Callable[[], Any], short_cert: ShortCert,
    tmp_path: Path,
) -> None:  # fmt: skip
    server, secure = await grpc_tls_server()
    try:
        prometheus = tmp_path / "prometheus.yml"
        targets = {"grpc": secure.target, "grpc_plain": grpc_server.target}
        jobs = [{"job_name": module, "metrics_path": "/probe", "params": {"module": [module]},
                 "static_configs": [{"targets": [address]}]}
                for module, address in targets.items()]  # fmt: skip
        prometheus.write_text(yaml.safe_dump({"scrape_configs": jobs}))
        flows, err = await run_import(DATA / "blackbox.yml", prometheus, tmp_path)
        assert "module 'grpc': preferred_ip_protocol/ip_protocol_fallback are not translated" in err
        roots = {"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(short_cert.ca_file)}
        rc, runs, err = await check(flows, list(targets), roots)
    finally:
        await server.stop(grace=None)
    assert rc == 1, err
    assert runs[("grpc", secure.target)]["outcome"] == "success"
    plain = runs[("grpc_plain", grpc_server.target)]  # asks for service1, which it does not know
    assert (plain["outcome"], plain["reason"]) == ("failure", "assertion")
    assert plain["steps"][0]["message"].startswith("status NOT_FOUND, want OK")


@pytest.mark.parametrize(
    ("prober", "section", "listed", "step"),
    [
        ("tcp", {"query_response": [{"expect": "^OK"}, {"expect_bytes": "S"}]},
         "entry 2 is not translated: expect_bytes has no equivalent",
         {"query_response": [{"expect": "^OK"}]}),
        ("tcp", {"query_response": [{"send": "{{ x }}"}]}, "send holds {{", {}),
        ("tcp", {"query_response": [{"starttls": True}, {"starttls": True}]},
         "entry 2 is not translated: a second starttls", {"query_response": [{"starttls": True}]}),
        ("tcp", {"tls": True, "query_response": [{"starttls": True}]},
         "tls: true with a starttls entry", {"tls": {}}),
        ("tcp", {"tls": True, "tls_config": {"server_name": "db.internal", "min_version": "TLS13"}},
         "tls_config.min_version is not translated", {"server_name": "db.internal", "tls": {}}),
        ("tcp", {"query_response": [{"expect": "x"}]}, "target 'db.internal' is not HOST:PORT", {}),
        ("tcp", {"query_response": [{"expect": "^(?P<v>\\S+)", "send": "ok $$"}]}, None,
         {"query_response": [{"expect": "^(?P<v>\\S+)"}, {"send": "ok $\n"}]}),
        ("tcp", {"query_response": [{"expect": "^(a) (?P<n>b)",
                                     "send": "X $1 ${n}$n $$ $${1} ${9}$nope $"}]}, None,
         {"query_response": [{"expect": "^(a) (?P<n>b)"},
                             {"send": "X ${1} ${n}${n} $ $${1}  $\n"}]}),
        ("tcp", {"query_response": [{"expect": "^(a)"}, {"send": "as is ${1}"}]}, None,
         {"query_response": [{"expect": "^(a)"}, {"send": "as is $${1}\n"}]}),
        ("tcp", {"query_response": [{"expect": "^(a)", "send": "$$$1"}]},
         "a literal $ right before a group", {}),
        ("grpc", {"tls": True, "tls_config": {"insecure_skip_verify": True}},
         "insecure_skip_verify is not translated (this kind always verifies", {"tls": {}}),
        ("dns", {"query_name": "example.org", "query_class": "CH"},
         "query_class CH (the step asks class IN) is not translated: no flow made", None),
        ("dns", {"query_name": "example.org", "query_type": "NOPE"},
         "unknown record type 'NOPE' is not translated: no flow made", None),
        ("dns", {"query_name": "example.org", "valid_rcodes": ["NOERROR", "BOGUS"]},
         "valid_rcodes is not translated (unknown rcode 'BOGUS')", {"query_type": "ANY"}),
        ("dns", {"query_name": "example.org", "query_type": "A", "recursion_desired": False,
                 "valid_rcodes": ["NOERROR", "NXDOMAIN"]},
         None,  # a name server given by name is resolved at each run, as blackbox does
         {"recursion": False, "expect": {"rcode": ["NOERROR", "NXDOMAIN"]}}),
        ("dns", {"query_name": "example.org", "transport_protocol": "quic"},
         "transport_protocol quic is not translated: the step asks over udp", {}),
    ],
)  # fmt: skip
def test_module_options(
    prober: str, section: dict[str, Any], listed: str | None, step: dict[str, Any] | None
) -> None:
    from monitor.importers.blackbox import import_blackbox

    module = {"prober": prober, prober: section}
    jobs = {"scrape_configs": [{"job_name": "j", "metrics_path": "/probe",
                                "params": {"module": ["m"]},
                                "static_configs": [{"targets": ["db.internal"]}]}]}  # fmt: skip
    result = import_blackbox({"modules": {"m": module}}, jobs)
    lines = [item.line() for item in result.untranslated]
    if listed is not None:
        assert any(listed in line for line in lines), lines
    else:
        assert not [line for line in lines if "target" not in line], lines
    if step is None:
        assert result.flows == []
    else:
        [flow] = result.flows
        assert step.items() <= flow.steps[0].items()
        result.validate()


@pytest.mark.parametrize(
    ("pattern", "translated"),
    [
        ("www.prometheus.io.\t300\tIN\tA\t127.0.0.1",
         "www.prometheus.io.[\\t ]300[\\t ]IN[\\t ]A[\\t ]127.0.0.1"),
        ("a\\tb", "a[\\t ]b"),
        ("[^\\t]+\\\\t", "[^\\t]+\\\\t"),  # in a class, and an escaped backslash: left alone
    ],
)  # fmt: skip
def test_tabs_in_record_regexes_match_the_spaces_of_the_steps_records(
    pattern: str, translated: str
) -> None:
    from monitor.importers.blackbox_dns import tabs_as_spaces

    assert tabs_as_spaces(pattern) == translated
