"""`hopwatch import blackbox` on blackbox_exporter's own example configuration: the http
modules' flows run with `hopwatch check` against a local server, decided as blackbox would;
every other module and option listed."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.fixtures.core import serve
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


async def imported(target: TestServer, tmp_path: Path) -> tuple[Path, str]:
    prometheus = tmp_path / "prometheus.yml"
    prometheus.write_text(
        (DATA / "prometheus.yml").read_text().replace("TARGET_HOST", f"127.0.0.1:{target.port}")
    )
    flows = tmp_path / "blackbox.yaml"
    rc, _, err = await command(
        sys.executable, "-m", "monitor", "import",
        "blackbox", str(DATA / "example.yml"), "--prometheus", str(prometheus), "-o", str(flows),
    )  # fmt: skip
    assert rc == 1, err
    return flows, err


@pytest.mark.parametrize(("password", "auth_outcome"), [("mysecret", "success"),
                                                        ("wrong", "failure")])  # fmt: skip
async def test_http_modules_run_and_decide_as_blackbox(
    target: TestServer, tmp_path: Path, password: str, auth_outcome: str
) -> None:
    flows, _ = await imported(target, tmp_path)
    rc, out, err = await command(
        sys.executable, "-m", "monitor", "check", str(flows), "--output", "json",
        "--listen", "127.0.0.1:0", env={PASSWORD_ENV: password},
    )  # fmt: skip
    assert rc == 1, err  # /broken fails its body check in every case
    runs = {(r["flow"], r["variant"]): r for r in json.loads(out)["runs"]}
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
    assert "29 items not translated: the import is incomplete" in err
    for module in ("tls_connect", "imap_starttls", "dns_udp_example", "dns_soa", "postgresql"):
        line = f"module '{module}': prober {'dns' if 'dns' in module else 'tcp'} is not yet " \
               "supported (needs the tcp/dns/grpc kinds)"  # fmt: skip
        assert line in err and line in text
    for line in (
        "module 'icmp_example': prober icmp is not supported",
        "module 'http_2xx_oauth_client_credentials': option oauth2 is not translated",
        "fail_if_header_matches on Set-Cookie with allow_missing (a header that may be absent)",
        "job 'kubernetes-services': targets from kubernetes_sd_configs are not read",
        "module 'http_gzip': no scrape job uses it",
    ):
        assert line in err and line in text
    assert "mysecret" not in text and f"export {PASSWORD_ENV}" in err
    assert "interval: 90s" in text  # the api job's 1m30s


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
