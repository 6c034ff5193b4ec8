"""`hopwatch import postman` round trip: a Conduit collection imported, run with `hopwatch
check` and with newman against the same local Conduit API, and each verdict compared."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from monitor.importers.report import safe_name
from tests.fixtures.postman import API_KEY, FAULTS, USER

DATA = Path(__file__).parent / "imports"
COLLECTION = DATA / "conduit.postman_collection.json"
SECRETS = {"POSTMAN_API_KEY": API_KEY, "POSTMAN_PASSWORD": USER["password"]}
ECHO = DATA / "echo.postman_collection.json"
ECHO_SECRETS = {"POSTMAN_PASSWORD": "s3cret-pass", "POSTMAN_API_TOKEN": "tok-123456"}


async def command(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def environment(
    server: TestServer, tmp_path: Path, name: str = "conduit", key: str = "APIURL"
) -> Path:
    """The collection's environment file, its base URL pointing at `server`."""
    env = json.loads((DATA / f"{name}.postman_environment.json").read_text())
    for value in env["values"]:
        if value["key"] == key:
            value["value"] = f"http://127.0.0.1:{server.port}"
    path = tmp_path / "env.json"
    path.write_text(json.dumps(env))
    return path


async def newman_verdicts(
    newman: Path, env: Path, tmp_path: Path, collection: Path = COLLECTION
) -> dict[str, bool]:
    """Request name → whether every assertion newman ran on it passed."""
    report = tmp_path / "newman.json"
    await command(str(newman), "run", str(collection), "-e", str(env), "--reporters", "json",
                  "--reporter-json-export", str(report))  # fmt: skip
    verdicts: dict[str, bool] = {}
    for execution in json.loads(report.read_text())["run"]["executions"]:
        passed = "requestError" not in execution and not any(
            "error" in a for a in execution.get("assertions", [])
        )
        verdicts[safe_name(execution["item"]["name"])] = passed
    return verdicts


async def hopwatch_verdicts(
    flows: Path, secrets: dict[str, str] = SECRETS
) -> dict[str, dict[str, str]]:
    """Flow → step → passed/failed/skipped."""
    rc, out, err = await command(
        sys.executable, "-m", "monitor", "check", str(flows), "--output", "json",
        "--listen", "127.0.0.1:0", env=secrets,
    )  # fmt: skip
    assert rc in (0, 1), err
    return {
        run["flow"]: {s["name"]: s["status"] for s in run["steps"]}
        for run in json.loads(out)["runs"]
    }


@pytest.mark.parametrize(
    ("faults", "newman_failed", "broken"),
    [
        (set(), set(), {}),
        ({"favorites"}, {"Create_Article"}, {"Articles": "Create_Article"}),
        ({"login_content_type"}, {"Login"}, {"Auth": "Login", "Articles": "Login"}),
        ({"tags_object"}, {"All_Tags"}, {"Tags": "All_Tags"}),
    ],
)
async def test_imported_collection_decides_as_newman_does(
    conduit: TestServer, newman: Path, tmp_path: Path, faults: set[str],
    newman_failed: set[str], broken: dict[str, str],
) -> None:  # fmt: skip
    env = environment(conduit, tmp_path)
    flows = tmp_path / "conduit.yaml"
    rc, _, err = await command(sys.executable, "-m", "monitor", "import", "postman",
                               str(COLLECTION), "-e", str(env), "-o", str(flows))  # fmt: skip
    assert rc == 1, err  # complete but for the three listed items
    conduit.app[FAULTS].update(faults)

    expected = await newman_verdicts(newman, env, tmp_path)
    assert {name for name, ok in expected.items() if not ok} == newman_failed
    got = await hopwatch_verdicts(flows)
    assert set(got) == {"Auth", "Users", "Articles", "Tags"}
    for flow, steps in got.items():
        failed = [name for name, status in steps.items() if status == "failed"]
        assert failed == ([broken[flow]] if flow in broken else []), (flow, steps)
        for name, status in steps.items():
            if status != "skipped":  # after a broken link hopwatch stops; newman goes on
                assert (status == "passed") == expected[name], (flow, name, status)


async def test_import_lists_what_it_left_out_and_keeps_secrets_out(tmp_path: Path) -> None:
    flows = tmp_path / "conduit.yaml"
    env = DATA / "conduit.postman_environment.json"
    rc, _, err = await command(
        sys.executable, "-m", "monitor", "import", "postman", str(COLLECTION), "-e", str(env),
        "-o", str(flows),
    )  # fmt: skip
    assert rc == 1
    text = flows.read_text()
    assert "3 items not translated: the import is incomplete" in err
    for what in ("prerequest script", "pm.sendRequest", "conditional or loop code"):
        assert "not translated: request 'Tags / All Tags': " in err and what in err
        assert what in text  # as a comment above the step
    assert "export POSTMAN_PASSWORD" in err and "export POSTMAN_API_KEY" in err
    for secret in SECRETS.values():
        assert secret not in text and secret not in err
    assert "# copied from request 'Auth / Login': sets {{token}}" in text
    rc, _out, err = await command(sys.executable, "-m", "monitor", "validate", str(flows),
                                 env=SECRETS)  # fmt: skip
    assert rc == 0, err


@pytest.mark.parametrize(("faults", "failed"), [(set(), {}), ({"mangle"}, {"Forms": "Form_login"})])
async def test_every_request_shape_reaches_the_server_as_newman_sends_it(
    echo: TestServer, newman: Path, tmp_path: Path, faults: set[str], failed: dict[str, str]
) -> None:
    """Bodies (urlencoded, form-data, GraphQL, raw with dynamic values), auth (basic from the
    folder, bearer, API key in the query), path variables, disabled headers, redirects:
    the server's echo, checked by the collection's own tests, passes for both tools."""
    env = environment(echo, tmp_path, "echo", "base")
    flows = tmp_path / "echo.yaml"
    rc, _, err = await command(sys.executable, "-m", "monitor", "import", "postman", str(ECHO),
                               "-e", str(env), "-o", str(flows))  # fmt: skip
    assert rc == 0, err  # everything translated
    echo.app[FAULTS].update(faults)
    expected = await newman_verdicts(newman, env, tmp_path, ECHO)
    assert len(expected) == 9
    assert {n for n, ok in expected.items() if not ok} == (
        {"Form_login", "Upload_fields"} if faults else set()
    )
    got = await hopwatch_verdicts(flows, ECHO_SECRETS)
    assert set(got) == {"Forms", "Auth", "Other"}
    for flow, steps in got.items():
        assert [n for n, st in steps.items() if st == "failed"] == (
            [failed[flow]] if flow in failed else []
        ), (flow, steps)
        for name, status in steps.items():
            if status != "skipped":
                assert (status == "passed") == expected[name], (flow, name, status)
