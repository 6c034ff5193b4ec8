"""`hopwatch import postman`: a Postman collection (v2.0, v2.1) as flows — top-level folders
become flows (or one flow), requests become `http` steps in order, test scripts assertions.

A flow must stand alone, so when a folder uses a variable that a request of an earlier folder
sets (a token from a login), that request is copied to the front of the flow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from monitor.importers.postman_checks import Checks
from monitor.importers.postman_request import request_step
from monitor.importers.postman_scripts import read_script, set_variables
from monitor.importers.postman_values import VARIABLE, FlowValues, Values
from monitor.importers.report import FlowOut, ImportError_, ImportResult, identifier, safe_name

_SCHEMAS = ("v2.0.0", "v2.1.0")


@dataclass(slots=True)
class Request:
    """A request with what applies to it from above: auth, scripts, its folder path."""

    item: dict[str, Any]
    path: list[str]  # folder names, outermost first
    auth: dict[str, Any] | None
    scripts: list[tuple[str, str, list[str]]]  # (level, listen, lines), outermost first
    flow: str
    position: int
    refs: set[str] = field(default_factory=set)
    sets: set[str] = field(default_factory=set)

    @property
    def where(self) -> str:
        return "request '" + " / ".join([*self.path, str(self.item.get("name", "?"))]) + "'"


def import_postman(
    collection: Any, environment: Any = None, *, one_flow: bool = False, source: str = ""
) -> ImportResult:
    """Translate a parsed collection (and environment) into flows."""
    _check_collection(collection)
    if environment is not None and not isinstance(environment.get("values", []), list):
        raise ImportError_("the environment has no `values` list")
    result = ImportResult(source=source or str(collection["info"].get("name", "collection")))
    values = Values.of(collection, environment)
    _folder_variables(collection["item"], [], values, result)
    for secret in values.secret:
        result.keep_secret(values.static.get(secret))
    name = str(collection["info"].get("name") or "collection")
    requests = _walk(collection, name, one_flow, result)
    if not requests:
        raise ImportError_("the collection has no requests")
    result.notes.append(
        "Requests without a status assertion are held to hopwatch's default: any 2xx."
    )
    taken: set[str] = set()
    for flow_name in dict.fromkeys(r.flow for r in requests):
        own = [r for r in requests if r.flow == flow_name]
        result.flows.append(_flow(flow_name, _with_setters(own, requests), values, result, taken))
    return result


def _folder_variables(items: list[Any], path: list[str], values: Values,
                      result: ImportResult) -> None:  # fmt: skip
    """Folders' own variables, read like the collection's; a name the collection, the
    environment or another folder gives another value is listed (flows share one set)."""
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("item"), list):
            continue
        where = "folder '" + " / ".join([*path, str(item.get("name", "?"))]) + "'"
        for var in item.get("variable") or []:
            if not isinstance(var, dict) or "key" not in var or var.get("disabled"):
                continue
            key = str(var["key"])
            if key in values.static and values.static[key] != var.get("value"):
                result.leave_out(where, f"variable {key!r} has another value elsewhere; the "
                                 "collection's or environment's is used")  # fmt: skip
            elif key not in values.static:
                values.add(key, var.get("value"), var.get("type") == "secret")
        _folder_variables(item["item"], [*path, str(item.get("name", "?"))], values, result)


def _check_collection(collection: Any) -> None:
    if not isinstance(collection, dict) or not isinstance(collection.get("info"), dict):
        raise ImportError_("not a Postman collection: no `info` object")
    if "requests" in collection or not isinstance(collection.get("item"), list):
        raise ImportError_("not a v2.0/v2.1 collection (export it from Postman as v2.1)")
    schema = str(collection["info"].get("schema", ""))
    if schema and not any(v in schema for v in _SCHEMAS):
        raise ImportError_(f"collection schema {schema} is not v2.0 or v2.1")


def _walk(
    collection: dict[str, Any], name: str, one_flow: bool, result: ImportResult
) -> list[Request]:
    out: list[Request] = []
    level = f"collection '{name}'"

    def visit(items: list[Any], path: list[str], auth: Any, scripts: list[Any], flow: str) -> None:
        for item in items:
            if not isinstance(item, dict):
                result.leave_out(level, "an item that is not an object", json.dumps(item)[:80])
                continue
            request = item.get("request")
            # A folder's auth is on the item, a request's inside its request.
            holder = request if isinstance(request, dict) and "item" not in item else item
            own_auth = holder.get("auth") if holder.get("auth") else auth
            if isinstance(own_auth, dict) and own_auth.get("type") == "inherit":
                own_auth = auth
            item_name = str(item.get("name") or "unnamed")
            if isinstance(item.get("item"), list):  # a folder
                where = "folder '" + " / ".join([*path, item_name]) + "'"
                sub_flow = flow if (one_flow or path) else item_name
                visit(item["item"], [*path, item_name], own_auth,
                      [*scripts, *_scripts(item, where)], sub_flow)  # fmt: skip
            else:
                req = Request(item, path, own_auth, [*scripts, *_scripts(item, "")], flow, len(out))
                _scan(req)
                out.append(req)

    visit(collection["item"], [], collection.get("auth"), _scripts(collection, level), name)
    return out


def _scripts(item: dict[str, Any], level: str) -> list[tuple[str, str, list[str]]]:
    out = []
    for event in item.get("event") or []:
        script = (event or {}).get("script") or {}
        lines = script.get("exec") or []
        lines = [lines] if isinstance(lines, str) else [str(x) for x in lines]
        if "\n".join(lines).strip() and not event.get("disabled"):
            out.append((level, str(event.get("listen", "")), lines))
    return out


def _scan(req: Request) -> None:
    """Which variables the request reads and which its test scripts set."""
    req.refs = {m.strip() for m in VARIABLE.findall(json.dumps(req.item.get("request")))}
    req.refs |= {m.strip() for m in VARIABLE.findall(json.dumps(req.auth))}
    for level, listen, lines in req.scripts:
        if listen == "test" and not level:
            req.sets |= set_variables("\n".join(lines))


def _with_setters(own: list[Request], every: list[Request]) -> list[tuple[Request, str]]:
    """The flow's requests, after copies of the earlier requests (of other flows) that set
    variables it reads first; each with a comment when it is a copy."""
    prefix: list[tuple[Request, str]] = []
    available: set[str] = set()

    def need(req: Request) -> None:
        for name in sorted(req.refs - available):
            setters = [
                r for r in every if name in r.sets and r.position < req.position and r not in own
            ]
            if setters and all(setters[-1] is not p for p, _ in prefix):
                setter = setters[-1]
                need(setter)
                prefix.append((setter, f"copied from {setter.where}: sets {{{{{name}}}}}"))
                available.update(setter.sets)
        available.update(req.sets)

    for req in own:
        need(req)
    return [*prefix, *((r, "") for r in own)]


def _flow(
    name: str, requests: list[tuple[Request, str]], values: Values, result: ImportResult,
    taken: set[str],
) -> FlowOut:  # fmt: skip
    flow = FlowOut(fields={"name": safe_name(name, taken, "flow")})
    refs = FlowValues(values, result)
    step_names: set[str] = set()
    reported: set[str] = set()
    for req, copied in requests:
        step = safe_name(str(req.item.get("name") or "request"), step_names)
        refs.where = req.where
        checks = Checks()
        notes = [copied] if copied else []
        for level, listen, lines in req.scripts:
            where = level or req.where
            report = (where not in reported or not level) and not copied
            _script(listen, lines, checks, refs, result, where, notes if report else None)
        reported.update(level for level, _, _ in req.scripts if level)
        built = request_step(req.item.get("request"), req.auth, step, refs, result, notes, copied)
        if built is None:
            continue
        expect = checks.expect()
        if expect:
            built["expect"] = expect
        if checks.extract:
            built["extract"] = {identifier(k): v for k, v in checks.extract.items()}
        flow.steps.append(built)
        flow.notes[step] = notes
        for var in checks.extract:
            refs.set_by[var] = step
    flow.fields["cookies"] = True  # Postman keeps a cookie jar across a run's requests
    if refs.variant:
        flow.fields["variants"] = {"default": refs.variant}
    return flow


def _script(
    listen: str, lines: list[str], checks: Checks, refs: FlowValues, result: ImportResult,
    where: str, notes: list[str] | None,
) -> None:  # fmt: skip
    """Read one script into `checks`, listing what is left out (once per script)."""

    def report(what: str, source: str) -> None:
        if notes is None:
            return
        item = result.leave_out(where, what, source)
        notes.append("not translated: " + item.line())

    if listen == "test":
        read_script("\n".join(lines), checks, report, lambda n: refs.ref(n))
    else:
        report(f"{listen} script is not translated", "\n".join(lines))
