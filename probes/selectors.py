"""Where a match rule reads an arrival: its key, a header, a JSON path, an XPath, and the texts
the correlator indexes a wanted value and a found one under (probes/waiting.py's rules)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Final

from probes.arrivals import Arrival
from probes.checks import PathReader, as_text, json_path_get, path_reader, same_value
from probes.xml_checks import xpath_get

Scalar = str | int | float | bool
HeaderLookup = Callable[[Mapping[str, str], str], str | None]


def _holds(values: list[Any], want: Scalar) -> bool:
    """Whether any of `values` is `same_value` as `want` (a loop: any() makes a generator)."""
    for value in values:  # noqa: SIM110
        if same_value(value, want):
            return True
    return False


@dataclass(frozen=True, slots=True, eq=False)
class KeySelector:
    """An arrival's (Kafka) key, read as Latin-1 so every byte string has its own text."""

    def texts(self, arrival: Arrival) -> tuple[str, ...]:
        return () if arrival.key is None else (_key_text(arrival.key),)


@dataclass(frozen=True, slots=True, eq=False)
class HeaderSelector:
    """One header, read as the rule reads it (case-insensitively for HTTP, exactly for Kafka)."""

    name: str
    header_of: HeaderLookup

    def texts(self, arrival: Arrival) -> tuple[str, ...]:
        value = self.header_of(arrival.headers, self.name)
        return () if value is None else (value,)


@dataclass(frozen=True, slots=True, eq=False)
class JsonPathSelector:
    """The values at one JSON path, as texts any wanted value they are `same_value` to has."""

    path: str
    read: PathReader = field(init=False, repr=False)  # its reader, found once per selector

    def __post_init__(self) -> None:
        object.__setattr__(self, "read", _reader(self.path))

    def texts(self, arrival: Arrival) -> Collection[str]:
        doc = arrival.json
        if doc is None:
            return ()
        found = self.read(doc)
        if len(found) == 1:  # a plain path's one value: its texts as they are, no set
            return found_texts(found[0])
        texts: set[str] = set()
        for value in found:
            texts.update(found_texts(value))
        return texts


@dataclass(frozen=True, slots=True, eq=False)
class XPathSelector:
    """The values at one XPath of an XML arrival, as texts (like JsonPathSelector's)."""

    path: str
    namespaces: tuple[tuple[str, str], ...]

    def texts(self, arrival: Arrival) -> set[str]:
        texts: set[str] = set()
        for found in _xpath_values(arrival, self.path, self.namespaces):
            texts.update(found_texts(found))
        return texts


def _xpath_values(
    arrival: Arrival, path: str, namespaces: tuple[tuple[str, str], ...]
) -> list[Any]:
    """What `path` selects in the arrival's XML; nothing for a body that is not XML, or when the
    XPath fails on it (a matcher never raises: a junk arrival is just a non-match)."""
    if arrival.xml is None:
        return []
    try:
        return xpath_get(arrival.xml, path, dict(namespaces))
    except Exception:  # lxml's XPathEvalError and kin, on a document the sender chose
        return []


# Selectors are interned: one object per place read (header name, JSON path: from flow files,
# so few), shared by every matcher, so they compare and hash by identity (eq=False). The
# correlator's index hashes them many times per arrival, and a dataclass's field-wise hash
# cost more than the rest of the look-up. Build them only through these four.
_KEY: Final = KeySelector()
_header = cache(HeaderSelector)
_json_path = cache(JsonPathSelector)
_xpath = cache(XPathSelector)


def _reader(path: str) -> PathReader:
    """`path_reader(path)`; a path that does not parse (configs are checked, so only a hand-made
    Rule) fails when it is read, as `json_path_get` does."""
    try:
        return path_reader(path)
    except Exception:
        return lambda doc: json_path_get(doc, path)


def wanted_text(want: Scalar) -> str:
    """The text a wanted value is indexed under: one of `found_texts(v)` for every JSON value
    v that `same_value(v, want)` accepts."""
    return want if isinstance(want, str) else as_text(want)


def found_texts(found: Any) -> tuple[str, ...]:
    """The texts of a JSON value: as a template reads it, and a float's Python spelling too
    ("3" and "3.0"), since `same_value` takes either for a float."""
    if isinstance(found, str):
        return (found,)
    if isinstance(found, float):
        return (as_text(found), str(found))
    return (as_text(found),)


def _key_text(key: bytes) -> str:
    return key.decode("latin-1")


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, case-insensitively, from an aiohttp CIMultiDict or a plain mapping."""
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lower:
            return candidate
    return None
