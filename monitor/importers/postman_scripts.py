"""Postman test scripts read with a real JavaScript parser (esprima): the common `pm.test`
patterns become assertions and extractions; every other statement is reported, not dropped.

The script is never run. A statement is translated only when its meaning is certain (an
assertion chain on the response, a variable set from the response); conditionals, loops,
`pm.sendRequest`, `setNextRequest` and other code are listed with their source text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import esprima

from monitor.importers.postman_assert import Assertion, Literal, Subject, apply_assertion
from monitor.importers.postman_checks import Checks, json_path

Report = Callable[[str, str], None]  # (what, source text)
VarRef = Callable[[str], str]  # a Postman variable name → its template text
_SETTERS = {
    ("pm", "environment", "set"), ("pm", "collectionVariables", "set"),
    ("pm", "globals", "set"), ("pm", "variables", "set"),
    ("postman", "setEnvironmentVariable"), ("postman", "setGlobalVariable"),
}  # fmt: skip
_GETTERS = {
    ("pm", "environment", "get"), ("pm", "collectionVariables", "get"),
    ("pm", "globals", "get"), ("pm", "variables", "get"), ("pm", "iterationData", "get"),
    ("postman", "getEnvironmentVariable"), ("postman", "getGlobalVariable"),
}  # fmt: skip
_QUIET = {("console", "log"), ("console", "info"), ("console", "warn"), ("console", "error")}
_LANGUAGE = {
    "to", "be", "been", "is", "that", "which", "and", "has", "have", "with", "at", "of",
    "same", "but", "does", "still", "deep", "nested", "own", "itself", "also",
}  # fmt: skip


class ScriptReader:
    """Reads one script into `checks`, calling `report` for what it leaves out."""

    def __init__(self, source: str, checks: Checks, report: Report, var_ref: VarRef) -> None:
        self.source = source
        self.checks = checks
        self.report = report
        self.var_ref = var_ref
        self.aliases: dict[str, Subject | Literal] = {}

    def read(self) -> None:
        try:
            program = esprima.parseScript(self.source, {"range": True, "loc": True})
        except esprima.Error as exc:
            self.report(f"script does not parse as JavaScript ({exc})", self.source)
            return
        for statement in program.body:
            self.statement(statement, "")

    def text(self, node: Any) -> str:
        start, end = node.range
        line = node.loc.start.line
        return f"line {line}: {self.source[start:end]}"

    def statement(self, node: Any, test: str) -> None:
        where = f"test {test!r}, " if test else ""
        if node.type == "EmptyStatement":
            return
        if node.type == "VariableDeclaration" and self.declare(node):
            return
        why = _why(node)
        if node.type == "ExpressionStatement":
            reason = self.expression(node.expression, test)
            if reason is None:
                return
            why = reason or why
        self.report(f"{where}{why}", self.text(node))

    def declare(self, node: Any) -> bool:
        for decl in node.declarations:
            if decl.id.type != "Identifier" or decl.init is None:
                return False
            value = self.subject(decl.init) or self.literal(decl.init)
            if value is None:
                return False
            self.aliases[decl.id.name] = value
        return True

    def expression(self, node: Any, test: str) -> str | None:
        """None when translated, else why not ("" for the generic reason)."""
        if node.type == "MemberExpression":  # a property assertion: `.to.be.ok`
            return self.assertion(node)
        if node.type != "CallExpression":
            return ""
        name = _dotted(node.callee)
        if name == ("pm", "test") and not test:
            return self.test(node)
        if name in _SETTERS:
            return None if self.setter(node) else ""
        if name in _QUIET:
            return None  # logging changes no outcome
        return self.assertion(node)

    def assertion(self, node: Any) -> str | None:
        chain = _chain(node)
        if chain is None:
            return ""
        subject_node, words = chain
        subject = Subject("response") if subject_node is None else self.subject(subject_node)
        if subject is None:
            return "an assertion on something other than the response"
        assertions = _assertions(words, self)
        if not assertions:
            return "an assertion chain without an assertion"
        reasons = [apply_assertion(self.checks, subject, a) for a in assertions]
        return next((r for r in reasons if r is not None), None)

    def test(self, node: Any) -> str | None:
        if len(node.arguments) != 2:
            return ""
        name_node, fn = node.arguments
        name = self.literal(name_node)
        title = str(name.value) if name is not None else self.text(name_node)
        if fn.type not in ("FunctionExpression", "ArrowFunctionExpression"):
            return "pm.test without a function literal"
        body = fn.body.body if fn.body.type == "BlockStatement" else [_Statement(fn.body)]
        for statement in body:
            self.statement(statement, title)
        return None

    def setter(self, node: Any) -> bool:
        if len(node.arguments) != 2:
            return False
        name = self.literal(node.arguments[0])
        subject = self.subject(node.arguments[1])
        if name is None or name.template or subject is None:
            return False
        if subject.kind == "json":
            self.checks.extract[str(name.value)] = {"json": json_path(subject.path)}
        elif subject.kind == "header":
            self.checks.extract[str(name.value)] = {"header": subject.name}
        else:
            return False
        return True

    def subject(self, node: Any) -> Subject | None:
        """What in the response `node` reads, or None when it is something else."""
        if node.type == "Identifier":
            alias = self.aliases.get(node.name)
            if isinstance(alias, Subject):
                return alias
            return {"responseBody": Subject("text"), "responseTime": Subject("time")}.get(node.name)
        name = _dotted(node)
        if name in (("pm", "response", "code"), ("responseCode", "code")):
            return Subject("code")
        if name == ("pm", "response", "responseTime"):
            return Subject("time")
        if node.type == "CallExpression":
            return self.call_subject(node)
        if node.type == "MemberExpression":
            return self.member_subject(node)
        return None

    def call_subject(self, node: Any) -> Subject | None:
        callee = _dotted(node.callee)
        args = [self.literal(a) for a in node.arguments]
        if callee == ("pm", "response", "json") and not args:
            return Subject("json", ())
        if callee == ("pm", "response", "text") and not args:
            return Subject("text")
        if callee == ("JSON", "parse") and len(node.arguments) == 1:
            inner = self.subject(node.arguments[0])
            return Subject("json", ()) if inner is not None and inner.kind == "text" else None
        header_calls = (("pm", "response", "headers", "get"), ("postman", "getResponseHeader"))
        if callee in header_calls and len(args) == 1 and args[0] is not None:
            return Subject("header", name=str(args[0].value))
        if callee == ("pm", "response", "headers", "has") and len(args) == 1 and args[0]:
            return Subject("has_header", name=str(args[0].value))
        return None

    def member_subject(self, node: Any) -> Subject | None:
        base = self.subject(node.object)
        if base is None or base.kind != "json":
            return None
        if node.computed:
            key = self.literal(node.property)
            if key is None or key.template or not isinstance(key.value, str | int | float):
                return None
            tok: str | int = int(key.value) if isinstance(key.value, float) else key.value
        else:
            tok = node.property.name
            if tok == "length":
                return Subject("length", base.path)
        return Subject("json", (*base.path, tok))

    def literal(self, node: Any) -> Literal | None:
        """The value of a literal expression, or None when it depends on the run."""
        kind = node.type
        if kind == "Literal":
            if getattr(node, "regex", None) is not None:
                return Literal(re.compile(_js_regex(node.regex.pattern, node.regex.flags)))
            return Literal(node.value)
        if kind == "TemplateLiteral" and not node.expressions:
            return Literal(node.quasis[0].value.cooked)
        if kind == "UnaryExpression" and node.operator in ("-", "+"):
            inner = self.literal(node.argument)
            if inner is not None and isinstance(inner.value, int | float):
                return Literal(-inner.value if node.operator == "-" else inner.value)
            return None
        if kind == "ArrayExpression":
            items = [self.literal(e) if e is not None else None for e in node.elements]
            if any(i is None for i in items):
                return None
            # Templates inside stay templates: `eql` renders them, the other assertions refuse.
            return Literal(
                [i.value for i in items if i is not None], any(i.template for i in items if i)
            )
        if kind == "ObjectExpression":
            return self._object(node)
        if kind == "Identifier":
            alias = self.aliases.get(node.name)
            return alias if isinstance(alias, Literal) else None
        if kind == "CallExpression" and _dotted(node.callee) in _GETTERS:
            name = self.literal(node.arguments[0]) if len(node.arguments) == 1 else None
            if name is not None and not name.template:
                return Literal(self.var_ref(str(name.value)), template=True)
        return None

    def _object(self, node: Any) -> Literal | None:
        out: dict[str, Any] = {}
        template = False
        for prop in node.properties:
            if prop.type != "Property" or prop.computed or prop.kind != "init":
                return None
            key = prop.key.name if prop.key.type == "Identifier" else str(prop.key.value)
            value = self.literal(prop.value)
            if value is None:
                return None
            out[key] = value.value
            template = template or value.template
        return Literal(out, template)


class _Statement:
    """An arrow function's expression body, read as the one statement of a block."""

    type = "ExpressionStatement"

    def __init__(self, expression: Any) -> None:
        self.expression = expression
        self.range = expression.range
        self.loc = expression.loc


def read_script(source: str, checks: Checks, report: Report, var_ref: VarRef) -> None:
    """Translate one test script into `checks`; `report(what, source)` gets the rest."""
    ScriptReader(source, checks, report, var_ref).read()


def set_variables(source: str) -> set[str]:
    """The variables a script sets from the response (for a pre-scan of who sets what)."""
    checks = Checks()
    ScriptReader(source, checks, lambda _what, _src: None, lambda name: name).read()
    return set(checks.extract)


def _dotted(node: Any) -> tuple[str, ...] | None:
    """`a.b.c` as ("a", "b", "c"); None for anything else."""
    parts: list[str] = []
    while node.type == "MemberExpression" and not node.computed:
        parts.append(node.property.name)
        node = node.object
    if node.type != "Identifier":
        return None
    parts.append(node.name)
    return tuple(reversed(parts))


Word = tuple[str, list[Any] | None]  # a chain word, with its arguments when it is called


def _chain(node: Any) -> tuple[Any, list[Word]] | None:
    """`pm.expect(X).to.be.below(5)` as (X, words); `pm.response.to.…` as (None, words)."""
    words: list[Word] = []
    while True:
        if node.type == "CallExpression" and node.callee.type == "MemberExpression":
            if _dotted(node.callee) == ("pm", "expect"):
                if not node.arguments:
                    return None
                return node.arguments[0], list(reversed(words))
            if node.callee.computed:
                return None
            words.append((node.callee.property.name, list(node.arguments)))
            node = node.callee.object
        elif node.type == "MemberExpression" and not node.computed:
            if _dotted(node) == ("pm", "response"):
                return None, list(reversed(words))
            words.append((node.property.name, None))
            node = node.object
        else:
            return None


def _assertions(words: list[Word], reader: ScriptReader) -> list[Assertion]:
    """The assertions a chain makes, in order (`.and` joins several on one subject)."""
    out: list[Assertion] = []
    negate = False
    for name, args in words:
        if name == "not":
            negate = not negate
            continue
        if args is None and name in _LANGUAGE:
            continue
        values = None if args is None else [reader.literal(a) for a in args]
        out.append(Assertion(name, values, negate))
        negate = False
    return out


def _js_regex(pattern: str, flags: str) -> str:
    """A JS regex literal as a Python pattern (inline flags for i, m, s)."""
    inline = "".join(f for f in flags if f in "ims")
    return f"(?{inline}){pattern}" if inline else pattern


def _why(node: Any) -> str:
    """A short reason for leaving a statement out."""
    if node.type == "ExpressionStatement" and node.expression.type == "CallExpression":
        name = _dotted(node.expression.callee) or ()
        if name[-1:] == ("sendRequest",):
            return "pm.sendRequest (a request from a script) is not translated"
        if name[-1:] == ("setNextRequest",):
            return "setNextRequest (run order control) is not translated"
        if name in _SETTERS:
            return "variable set from something other than a response value"
        return "a call not understood"
    if node.type in ("IfStatement", "ForStatement", "WhileStatement", "ForOfStatement"):
        return "conditional or loop code is not translated"
    if node.type == "VariableDeclaration":
        return "a variable not taken from the response or a literal"
    return "code not understood"
