"""An arrival as a control-topic record: the body as the value, everything else in headers.

The replica that received a webhook verified its signature and stamped when it came; the
owner takes both as they were (its latency is measured from the sender's moment of arrival,
not from the forwarding), and parses the body again under the same limits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from probes import untrusted_json
from probes.arrivals import Arrival
from probes.xml_checks import NotXml, parse_xml

META = "hopwatch-arrival"  # the record header with channel, times, delivery id, meta


@dataclass(frozen=True, slots=True)
class Refusal:
    """A delivery the receiving replica refused, told to the replica owning its path so that
    the waiting step says `signature`, not `not_received`."""

    channel: str
    why: str
    signature: bool


def encode_refusal(refusal: Refusal, replica: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    meta = {"kind": "refusal", "channel": refusal.channel, "why": refusal.why,
            "signature": refusal.signature, "via": replica}  # fmt: skip
    return b"", [(META, json.dumps(meta).encode())]


def encode_arrival(arrival: Arrival, replica: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    meta = {
        "source": arrival.source,
        "channel": arrival.channel,
        "received_unix": arrival.received_unix,
        "delivery_id": arrival.delivery_id,
        "xml": arrival.xml is not None,
        "meta": {k: v for k, v in arrival.meta.items() if _plain(v)},
        "via": replica,
    }
    headers = [(str(name), value.encode()) for name, value in arrival.headers.items()]
    headers.append((META, json.dumps(meta).encode()))
    return arrival.body, headers


def decode_arrival(value: bytes, headers: Sequence[tuple[str, bytes]]) -> Arrival | Refusal | None:
    """The arrival (or refusal) a record carries, or None for a record that is neither."""
    meta: dict[str, Any] | None = None
    kept: CIMultiDict[str] = CIMultiDict()
    for name, raw in headers:
        if name == META:
            try:
                loaded = json.loads(raw)
            except ValueError:
                return None
            meta = loaded if isinstance(loaded, dict) else None
        else:
            kept.add(name, raw.decode("utf-8", "replace"))
    if meta is not None and meta.get("kind") == "refusal":
        try:
            return Refusal(str(meta["channel"]), str(meta["why"]), bool(meta["signature"]))
        except KeyError:
            return None
    if meta is None or meta.get("source") not in ("webhook", "kafka"):
        return None
    try:
        received_unix = float(meta["received_unix"])
        channel = str(meta["channel"])
        if meta.get("xml"):  # an XML delivery (refused entities and all at the first replica)
            doc, root = None, parse_xml(value)
        else:
            # The first replica held the body to its own size limit; nesting is checked again.
            doc = untrusted_json.loads(value, max_bytes=len(value)) if value else None
            root = None
    except (KeyError, TypeError, ValueError, RecursionError, NotXml):
        return None
    age = max(0.0, time.time() - received_unix)
    return Arrival(
        source=meta["source"],
        channel=channel,
        received_at=time.monotonic() - age,  # when it reached the first replica
        received_unix=received_unix,
        headers=kept,
        body=value,
        json=doc,
        delivery_id=meta.get("delivery_id"),
        meta={**(meta.get("meta") or {}), "forwarded_by": meta.get("via")},
        xml=root,
    )


def _plain(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)
