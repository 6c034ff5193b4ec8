"""The command line as a pipeline uses it: exit codes 0/1/2, the hop table, JSON and JUnit."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import aiohttp
from aiohttp.test_utils import TestServer

from monitor.demo.shop import FAULTS_KEY
from monitor.output import console_for, table
from monitor.results import RunResult, StepResult
from tests.fixtures.core import free_port

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "http-only.yaml"
HOPWATCH = [sys.executable, "-m", "monitor"]


async def hopwatch(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = await asyncio.create_subprocess_exec(
        *HOPWATCH, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def example_for(shop: TestServer, tmp_path: Path) -> Path:
    path = tmp_path / "shop.yaml"
    path.write_text(EXAMPLE.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{shop.port}"))
    return path


async def test_check_passes_with_a_hop_table(shop: TestServer, tmp_path: Path) -> None:
    code, out, _ = await hopwatch("check", str(example_for(shop, tmp_path)))
    assert code == 0, out
    assert "create_order" in out and "read_back" in out and "passed" in out
    assert "1/1 runs passed" in out


async def test_check_fails_naming_the_broken_step_and_reason(
    shop: TestServer, tmp_path: Path
) -> None:
    shop.app[FAULTS_KEY].status = 503
    code, out, _ = await hopwatch("check", str(example_for(shop, tmp_path)))
    assert code == 1
    assert "broken: checkout/stable:create_order (http_status)" in out
    shop.app[FAULTS_KEY].status = None
    shop.app[FAULTS_KEY].wrong_body = True
    code, out, _ = await hopwatch("check", str(example_for(shop, tmp_path)), "--output", "json")
    assert code == 1
    report = json.loads(out)
    assert report["passed"] is False
    [run] = report["runs"]
    assert (run["broken_step"], run["reason"]) == ("create_order", "assertion")
    assert run["steps"][1]["status"] == "skipped"
    # JUnit: the broken hop fails, the one after it is skipped (and says why), never failed
    code, out, _ = await hopwatch("check", str(example_for(shop, tmp_path)), "--output", "junit")
    assert code == 1
    (suite,) = ET.fromstring(out.split("?>", 1)[1]).iter("testsuite")
    assert (suite.get("failures"), suite.get("skipped")) == ("1", "1")
    read_back = next(c for c in suite.iter("testcase") if c.get("name") == "read_back")
    assert read_back.find("failure") is None
    skipped = read_back.find("skipped")
    assert skipped is not None
    assert skipped.get("message") == "skipped: create_order broke (assertion)"


async def test_check_table_is_full_width_and_unwrapped_without_a_terminal(
    shop: TestServer, tmp_path: Path
) -> None:
    """A CI log is not a terminal: no 80-column wrap, no name broken mid-word."""
    shop.app[FAULTS_KEY].status = 503
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = await asyncio.create_subprocess_exec(
        *HOPWATCH, "check", str(example_for(shop, tmp_path)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 1
    row = next(line for line in text.splitlines() if "create_order" in line)
    assert "http_status" in row and "status 503, want 201" in row, text
    assert len(max(text.splitlines(), key=len)) > 80
    assert "\x1b[" not in text  # no colour codes in a log


async def test_check_junit_and_repeat(shop: TestServer, tmp_path: Path) -> None:
    code, out, _ = await hopwatch(
        "check", str(example_for(shop, tmp_path)), "--output", "junit", "--repeat", "2"
    )
    assert code == 0
    suites = ET.fromstring(out.split("?>", 1)[1])
    assert len(suites.findall("testsuite")) == 2
    assert {c.get("name") for c in suites.iter("testcase")} == {"create_order", "read_back"}


async def test_bad_config_exits_2_with_file_and_line(tmp_path: Path) -> None:
    bad = ROOT / "tests" / "configs" / "invalid" / "unknown-field.yaml"
    for command in ("check", "validate"):
        code, _, err = await hopwatch(command, str(bad))
        assert code == 2
        assert f"{bad}:7: flow 'checkout' step 'a': expekt: Extra inputs are not permitted" in err


async def test_validate_ok_and_schema() -> None:
    code, out, _ = await hopwatch("validate", str(EXAMPLE))
    assert code == 0 and "ok: 1 flow, 2 steps in 1 file" in out
    code, out, _ = await hopwatch("schema")
    assert code == 0
    assert "flows" in json.loads(out)["properties"]


async def test_demo_serves_contract_metrics_and_stops_by_itself() -> None:
    admin, shop, public, kafka = free_port(), free_port(), free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        *HOPWATCH, "demo", "--duration", "30",
        "--admin-listen", f"127.0.0.1:{admin}", "--shop-listen", f"127.0.0.1:{shop}",
        "--listen", f"127.0.0.1:{public}", "--kafka-listen", f"127.0.0.1:{kafka}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        text = ""
        async with aiohttp.ClientSession() as http:
            for _ in range(150):  # up to ~15 s for the first runs to land
                await asyncio.sleep(0.1)
                try:
                    async with http.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                        text = await resp.text()
                except aiohttp.ClientConnectionError:
                    continue
                # the stable variant's first step (the canary's may land first)
                if 'location="local",step="create_order",variant="stable"' in text:
                    break
        assert 'hopwatch_step_duration_seconds_count{flow="checkout",kind="http"' in text
        assert 'location="local",step="create_order",variant="stable"' in text
        assert "# TYPE hopwatch_step_failures_total counter" in text
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


async def test_demo_refuses_an_orders_database_it_cannot_write_to() -> None:
    code, _, err = await hopwatch("demo", "--orders-db", "mysql+pymysql://u:hunter22@db/shop")
    assert code == 2
    assert "--orders-db: driver 'mysql+pymysql' is not async" in err
    assert "hunter22" not in err


async def test_run_serves_metrics_and_stops_on_sigterm_within_grace(tmp_path: Path) -> None:
    """A hanging target keeps a run in flight; SIGTERM ends it after the grace, as aborted."""
    from tests.fixtures.core import serve
    from tests.test_http import STARTED, target_app

    target = await serve(target_app())
    flows = tmp_path / "hang.yaml"
    flows.write_text(
        "flows:\n  - name: stuck\n    interval: 1m\n    jitter: 0s\n    timeout: 30s\n"
        f"    steps: [{{name: s, kind: http, url: 'http://127.0.0.1:{target.port}/hang'}}]\n"
    )
    admin = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        *HOPWATCH, "run", str(flows), "--admin-listen", admin, "--store", "none",
        "--grace", "0.5", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.wait_for(target.app[STARTED].wait(), 15)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 10)
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await target.close()


def test_tables_without_a_terminal_keep_each_row_on_one_line() -> None:
    """A failure's detail stays whole on its row (no 80-column wrap, no 200-character cut)."""
    detail = "no delivery on /hooks/fulfilment with $.order_id='ord-12345' within 10s " * 4
    step = StepResult("fulfilment_webhook_with_a_long_name", "webhook_await", "failed", 0.0, 0.0,
                      reason="not_received", message=detail)  # fmt: skip
    run = RunResult("r", "checkout", "stable", "l", "c", 0.0, 1.0, "failure", [step])
    stream = io.StringIO()
    table([run], console_for(stream))
    row = next(line for line in stream.getvalue().splitlines() if "fulfilment" in line)
    assert "fulfilment_webhook_with_a_long_name" in row and detail.strip() in row
