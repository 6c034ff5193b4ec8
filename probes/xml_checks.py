"""XPath on XML bodies (SOAP answers, XML webhooks), parsed so that a hostile body can do nothing:
no entity expansion, no external entities or DTDs, no network, no huge trees.

A body that declares entities is refused outright rather than parsed around: a SOAP or XML API
has no use for them, and they are how billion-laughs and XXE attacks arrive.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final

from lxml import etree

MAX_XML_BYTES: Final = 10 * 1024 * 1024
# Not the document's: the parser's. resolve_entities=False keeps entity references unexpanded;
# no_network and load_dtd=False keep it from fetching anything.
_PARSER: Final = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_comments=True,
)


class NotXml(Exception):
    """The body is not XML hopwatch will read: malformed, too large, or declaring entities."""


def parse_xml(body: bytes) -> Any:
    """The body's root element; NotXml saying why it is refused."""
    if len(body) > MAX_XML_BYTES:
        raise NotXml(f"body is over {MAX_XML_BYTES} bytes")
    try:
        root = etree.fromstring(body, parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        raise NotXml(f"body is not XML: {exc}") from None
    if root is None:
        raise NotXml("body is not XML: empty")
    dtd = root.getroottree().docinfo.internalDTD
    if dtd is not None and any(True for _ in dtd.iterentities()):
        raise NotXml("body declares XML entities: refused (entity expansion, XXE)")
    return root


@lru_cache(maxsize=1024)
def compiled(path: str, namespaces: tuple[tuple[str, str], ...]) -> Any:
    return etree.XPath(path, namespaces=dict(namespaces))


def validate_xpath(path: str, namespaces: Mapping[str, str]) -> str:
    """Refuse an XPath that does not compile or names a prefix not declared, at config time."""
    try:
        compiled(path, tuple(sorted(namespaces.items())))(etree.fromstring(b"<x/>"))
    except etree.XPathError as exc:
        raise ValueError(f"bad XPath {path!r}: {exc}") from None
    return path


def xpath_get(root: Any, path: str, namespaces: Mapping[str, str]) -> list[Any]:
    """The values `path` selects: elements as their text, attributes and text as strings,
    numbers and booleans as they are; empty when nothing matches."""
    result = compiled(path, tuple(sorted(namespaces.items())))(root)
    if not isinstance(result, list):
        return [_number(result)]
    return [_value(item) for item in result]


def _value(item: Any) -> Any:
    if isinstance(item, etree._Element):
        return "".join(item.itertext())
    return str(item)  # an attribute's or text node's value (a "smart string")


def _number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return str(value) if isinstance(value, bytes | str) else value
