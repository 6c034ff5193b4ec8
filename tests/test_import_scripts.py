"""Postman test scripts as assertions: each common pattern, translated, decides a response
as its JavaScript would; everything else is listed with its line, never dropped."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from monitor.importers.postman import import_postman
from monitor.importers.postman_checks import Checks
from monitor.importers.postman_scripts import read_script
from monitor.importers.report import ImportError_
from probes.checks import Expect, check
from probes.errors import StepFailed
from tests.test_import_postman import command

BODY = {"user": {"name": "ada", "tags": ["a", "b"], "age": 36, "bio": None, "ok": True},
        "items": [{"id": 7}], "title": "How to train your dragon"}  # fmt: skip
HEADERS = {"Content-Type": "application/json; charset=utf-8", "X-Id": "42"}


def translate(script: str) -> tuple[Checks, list[str]]:
    checks, left = Checks(), []
    read_script(script, checks, lambda what, src: left.append(f"{what}: {src}"),
                lambda name: f"{{{{ variant.{name} }}}}")  # fmt: skip
    return checks, left


def decides(checks: Checks, status: int = 200, body: Any = BODY, latency: float = 0.1) -> bool:
    expect = Expect.model_validate(checks.expect())
    try:
        check(expect, status=status, headers=HEADERS, body=json.dumps(body).encode(),
              latency_s=latency)  # fmt: skip
    except StepFailed:
        return False
    return True


# (script, does it pass on BODY/HEADERS/200/100 ms)
CASES = [
    ("pm.response.to.have.status(200)", True),
    ("pm.response.to.have.status(201)", False),
    ('pm.response.to.have.status("OK")', True),
    ("pm.response.to.be.ok", True),
    ("pm.response.to.be.success", True),
    ("pm.response.to.be.notFound", False),
    ("pm.expect(pm.response.code).to.be.oneOf([200, 201])", True),
    ("pm.expect(pm.response.code).to.not.eql(200)", False),
    ("pm.expect(pm.response.responseTime).to.be.below(500)", True),
    ("pm.expect(pm.response.responseTime).to.be.below(50)", False),
    ('pm.response.to.have.header("X-Id")', True),
    ('pm.response.to.have.header("X-Id", "43")', False),
    ('pm.expect(pm.response.headers.get("Content-Type")).to.include("json")', True),
    ('pm.expect(pm.response.headers.get("Content-Type")).to.eql("text/html")', False),
    ('pm.expect(pm.response.headers.get("X-Id")).to.match(/^4\\d$/)', True),
    ('pm.expect(pm.response.headers.has("X-Gone")).to.be.true', False),
    ('pm.expect(pm.response.json().user.name).to.eql("ada")', True),
    ('const j = pm.response.json(); pm.expect(j.user.name).to.equal("bob")', False),
    ("var d = JSON.parse(responseBody); pm.expect(d.items[0].id).to.eql(7)", True),
    ('pm.expect(pm.response.json().user.tags).to.include("b")', True),
    ('pm.expect(pm.response.json().user.tags).to.include("z")', False),
    ('pm.expect(pm.response.json().title).to.include("dragon")', True),
    ('pm.expect(pm.response.json().user.age).to.be.a("number")', True),
    ('pm.expect(pm.response.json().user.age).to.be.a("string")', False),
    ("pm.expect(pm.response.json().user.age).to.be.above(40)", False),
    ("pm.expect(pm.response.json().user.age).to.be.within(30, 40)", True),
    ("pm.expect(pm.response.json().user.bio).to.be.null", True),
    ("pm.expect(pm.response.json().user.ok).to.be.true", True),
    ("pm.expect(pm.response.json().user.tags.length).to.eql(2)", True),
    ("pm.expect(pm.response.json().user.tags).to.have.lengthOf(3)", False),
    ('pm.expect(pm.response.json().user).to.have.property("name", "ada")', True),
    ('pm.expect(pm.response.json().user).to.not.have.property("password")', True),
    ("pm.expect(pm.response.json().missing).to.exist", False),
    ("pm.expect(pm.response.json().user.tags).to.be.an('array').that.is.not.empty", True),
    ('pm.expect(pm.response.json().user.name).to.be.oneOf(["ada", "bob"])', True),
    ('pm.expect(pm.response.text()).to.include("dragon")', True),
    ('pm.expect(pm.response.text()).to.not.include("dragon")', False),
    ('pm.response.to.have.jsonSchema({type: "object", required: ["user", "items"]})', True),
    ("const s = {type: 'object', required: ['nope']}; pm.response.to.have.jsonSchema(s)", False),
    ('pm.test("t", () => { pm.response.to.have.status(200); pm.response.to.be.json; })', True),
]


@pytest.mark.parametrize(("script", "passes"), CASES)
def test_pattern_decides_as_the_script_would(script: str, passes: bool) -> None:
    checks, left = translate(script)
    assert left == []
    assert decides(checks) is passes


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ('pm.sendRequest("http://x", () => {})', "pm.sendRequest"),
        ("postman.setNextRequest('Login')", "setNextRequest"),
        ("if (pm.response.code === 200) { pm.expect(1).to.eql(1); }", "conditional or loop"),
        ("for (const x of [1]) {}", "conditional or loop"),
        ("pm.expect(pm.response.json()?.user).to.exist", "does not parse as JavaScript"),
        ("tests['ok'] = responseCode.code === 200;", "code not understood"),
        ('pm.environment.set("n", Date.now())', "variable set from something other"),
        ('pm.expect(pm.response.json().n).to.be.above(pm.environment.get("min"))', "only eql"),
        ("pm.expect(pm.response.responseTime).to.be.above(5)", "response time"),
    ],
)
def test_what_is_not_translated_is_listed_with_its_line(script: str, why: str) -> None:
    _, left = translate(script)
    assert len(left) == 1
    assert why in left[0]


def test_values_set_from_the_response_become_extracts() -> None:
    checks, left = translate(
        'const j = pm.response.json();\npm.environment.set("id", j.items[0].id);\n'
        'pm.collectionVariables.set("loc", pm.response.headers.get("Location"));\n'
        "postman.setEnvironmentVariable('t', JSON.parse(responseBody).user.name);\n"
        'console.log("done");'
    )
    assert left == []
    assert checks.extract == {
        "id": {"json": "$.items[0].id"}, "loc": {"header": "Location"},
        "t": {"json": "$.user.name"},
    }  # fmt: skip


def collection(items: list[Any], **extra: Any) -> dict[str, Any]:
    schema = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
    return {"info": {"name": "c", "schema": schema}, "item": items, **extra}


def request(name: str, url: str, test: str = "") -> dict[str, Any]:
    event = [{"listen": "test", "script": {"exec": [test]}}] if test else []
    return {"name": name, "request": {"method": "GET", "url": url}, "event": event}


def test_one_flow_keeps_collection_order_and_passes_values_along() -> None:
    items = [
        {"name": "A", "item": [request("login", "{{h}}/login",
                                       'pm.environment.set("tok", pm.response.json().t)')]},
        {"name": "B", "item": [request("me", "{{h}}/me?t={{tok}}")]},
    ]  # fmt: skip
    result = import_postman(collection(items, variable=[{"key": "h", "value": "http://x"}]),
                            one_flow=True)  # fmt: skip
    assert [f.fields["name"] for f in result.flows] == ["c"]
    steps = result.flows[0].steps
    assert [s["name"] for s in steps] == ["login", "me"]
    assert steps[1]["url"] == "{{ variant.h }}/me?t={{ steps.login.tok }}"
    result.validate()


def test_unknown_variables_and_dynamic_ones_without_a_run_value_are_said() -> None:
    result = import_postman(collection([request("r", "http://x/{{nowhere}}/{{$randomColor}}")]))
    assert "POSTMAN_NOWHERE" in result.exports
    assert "not defined in the collection or environment" in result.exports["POSTMAN_NOWHERE"].why
    assert any("$randomColor" in i.what for i in result.untranslated)
    assert result.flows[0].steps[0]["url"] == "http://x/${env:POSTMAN_NOWHERE}/{{ run.id }}"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "not a Postman collection: no `info` object"),
        ({"info": {"name": "v1"}, "requests": []}, "not a v2.0/v2.1 collection"),
        ({"info": {"schema": "https://x/v3.0.0/c.json"}, "item": []}, "is not v2.0 or v2.1"),
        (collection([]), "the collection has no requests"),
    ],
)
def test_bad_collections_are_refused_with_a_reason(document: Any, message: str) -> None:
    with pytest.raises(ImportError_, match=message.replace("(", r"\(").replace(".", r"\.")):
        import_postman(document)


async def test_unreadable_input_exits_2_saying_why(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    rc, out, err = await command(sys.executable, "-m", "monitor", "import", "postman", str(bad))
    assert rc == 2 and out == "" and "the collection is not valid JSON" in err
    rc, _, err = await command(sys.executable, "-m", "monitor", "import", "blackbox", str(bad))
    assert rc == 2 and "the configuration is not valid JSON" in err
    config = tmp_path / "blackbox.yml"
    config.write_text("modules: [http_2xx]\n")
    rc, _, err = await command(sys.executable, "-m", "monitor", "import", "blackbox", str(config))
    assert rc == 2 and "not a blackbox_exporter configuration: no `modules` mapping" in err


async def test_the_table_is_what_newman_decides(newman: Path, tmp_path: Path) -> None:
    """Each row's expected verdict, checked by newman against a server answering BODY with
    HEADERS (the latency rows are left out: a local answer is always fast)."""
    from aiohttp import web

    from tests.fixtures.core import serve
    from tests.test_import_postman import newman_verdicts

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(BODY), headers=HEADERS)

    app = web.Application()
    app.router.add_get("/", answer)
    server = await serve(app)
    try:
        rows = [(i, s, p) for i, (s, p) in enumerate(CASES) if "responseTime" not in s]
        items = [
            request(f"case {i}", f"http://127.0.0.1:{server.port}/",
                    s if s.startswith("pm.test") else f'pm.test("case", () => {{ {s}; }});')
            for i, s, _ in rows
        ]  # fmt: skip
        path = tmp_path / "cases.json"
        path.write_text(json.dumps(collection(items)))
        env = tmp_path / "env.json"
        env.write_text(json.dumps({"name": "e", "values": []}))
        verdicts = await newman_verdicts(newman, env, tmp_path, path)
    finally:
        await server.close()
    assert {f"case_{i}": p for i, _, p in rows} == verdicts


def test_folder_variables_are_read_and_a_clash_is_listed() -> None:
    folder = {"name": "F", "variable": [{"key": "path", "value": "/a"}, {"key": "h", "value": "x"}],
              "item": [request("r", "{{h}}{{path}}")]}  # fmt: skip
    result = import_postman(collection([folder], variable=[{"key": "h", "value": "http://h"}]))
    assert result.flows[0].fields["variants"]["default"] == {"h": "http://h", "path": "/a"}
    assert [i.what for i in result.untranslated] == [
        "variable 'h' has another value elsewhere; the collection's or environment's is used"
    ]


def test_a_script_quoting_a_secret_is_listed_masked() -> None:
    env = {"values": [{"key": "api_token", "value": "tok-secret-9", "type": "secret"}]}
    item = request("r", "http://x/", 'pm.request.headers.add({key: "A", value: "tok-secret-9"})')
    result = import_postman(collection([item]), env)
    text = result.to_yaml()
    assert len(result.untranslated) == 1
    assert "tok-secret-9" not in text and "tok-secret-9" not in result.untranslated[0].line()
    assert 'value: "***"' in result.untranslated[0].line()


def test_a_request_an_http_step_cannot_send_is_listed_not_guessed() -> None:
    items = [
        {"name": "no url", "request": {"method": "GET"}},
        {"name": "odd", "request": {"method": "PROPFIND", "url": "http://x/"}},
        {"name": "ok", "request": "localhost:3000/health"},
    ]
    result = import_postman(collection(items))
    assert [s["name"] for s in result.flows[0].steps] == ["ok"]
    assert result.flows[0].steps[0]["url"] == "http://localhost:3000/health"
    assert [i.what for i in result.untranslated] == [
        "the request has no URL; step left out",
        "method PROPFIND is not one an http step sends; step left out",
    ]
