"""The one JSON decoder for bytes from outside (webhooks, records, responses), so nesting or size
can never raise past a caller that expects a plain "not JSON".

`json.loads` raises `RecursionError` on deep nesting (not a `ValueError`) and spends time and
memory in proportion to the input; `loads` refuses what is over `max_bytes` or nests deeper than
`max_depth` before decoding, and turns every decoding failure into `NotJson` (a `ValueError`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

__all__ = ["MAX_BYTES", "MAX_DEPTH", "NotJson", "loads"]

MAX_BYTES: Final = 1024 * 1024  # the webhook receiver's default body limit too
MAX_DEPTH: Final = 100  # arrays and objects inside each other; real payloads nest under 20

# A JSON string (so brackets inside it do not count) or a bracket.
_TOKENS: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class NotJson(ValueError):
    """The bytes are not JSON hopwatch accepts; the message says why, never quoting the input."""


def loads(body: bytes, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON document in `body`; raises NotJson when it is over a limit or not JSON."""
    if len(body) > max_bytes:
        raise NotJson(f"{len(body)} bytes, over the {max_bytes}-byte limit")
    depth = nesting(body, max_depth)
    if depth > max_depth:
        raise NotJson(f"nested deeper than {max_depth} levels")
    try:
        if body[:1] in _OPENERS and body[1:2] != b"\0":
            # What json.loads would detect (no BOM, no NUL in the first two bytes: UTF-8),
            # decoded as its decoder would (`JSONDecoder.decode`: its scanner, then nothing
            # but whitespace), without its detection and two decoder methods run in Python.
            text = body.decode("utf-8", "surrogatepass")
            try:
                doc, end = _scan(text, 0)  # no leading whitespace: it opens with { or [
            except StopIteration as err:
                raise json.JSONDecodeError("Expecting value", text, err.value) from None
            trailing = _WHITESPACE.match(text, end)  # always matches, if only ""
            end = trailing.end() if trailing is not None else end
            if end != len(text):
                raise json.JSONDecodeError("Extra data", text, end)
            return doc
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise NotJson(_reason(exc)) from None


_OPENERS: Final = (b"{", b"[")
# json.loads's own (C) scanner: (text, index) → (value, end); typeshed does not declare it
_Scanner = Callable[[str, int], tuple[Any, int]]
_scan: Final[_Scanner] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")  # what JSONDecoder.decode skips


def nesting(body: bytes, stop_above: int) -> int:
    """How deep arrays and objects nest in `body`, counted up to `stop_above + 1`."""
    # Fewer brackets than the limit cannot nest past it: the usual case costs two C scans.
    if body.count(b"[") + body.count(b"{") <= stop_above:
        return 0
    depth = 0
    for token in _TOKENS.finditer(body):
        first = token.group()[0]
        if first in b"[{":
            depth += 1
            if depth > stop_above:
                return depth
        elif first in b"]}":
            depth -= 1
    return max(depth, 0)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply to decode"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 ({exc.reason} at byte {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc)
