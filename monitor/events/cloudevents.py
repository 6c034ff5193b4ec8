"""CloudEvents 1.0 in structured JSON mode: what a finished run and an incident change look like.

Each event is one Kafka record: the value is the JSON envelope, the `content-type` header says
`application/cloudevents+json`, and the key is the event's subject (the link for incidents,
`flow/variant` for runs), so one link's events land on one partition and stay in order.
Data are the API's own run summary and incident views, so a consumer reads one vocabulary
whichever way it gets hopwatch's results; the one addition, the broken step's message, is
already redacted by the runner, and no header, variable or secret of a flow goes into an event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from monitor.api.views import summary_of
from monitor.results import RunResult
from monitor.store.incidents import Incident, Transition
from monitor.store.views import IncidentView

__all__ = [
    "CONTENT_TYPE",
    "EVENT_TYPES",
    "RUN_FINISHED",
    "Event",
    "incident_event",
    "run_finished",
    "source_of",
]

CONTENT_TYPE = "application/cloudevents+json"
RUN_FINISHED = "dev.hopwatch.run.finished"
INCIDENT_PREFIX = "dev.hopwatch.incident."
EVENT_TYPES = (RUN_FINISHED, *(INCIDENT_PREFIX + t for t in ("opened", "closed", "reopened")))


@dataclass(frozen=True, slots=True)
class Event:
    """One encoded event, ready to be a record: its type (for the metrics), key and value."""

    type: str
    key: bytes
    value: bytes


def source_of(replica: str) -> str:
    """`hopwatch/<replica>`: a URI-reference naming the process that decided the event."""
    return "hopwatch/" + quote(replica, safe="-._~")


def rfc3339(unix: float) -> str:
    """`2026-01-02T03:04:05.678901Z`: RFC 3339 in UTC, to the microsecond."""
    stamp = datetime.fromtimestamp(unix, UTC).isoformat(timespec="microseconds")
    return stamp.removesuffix("+00:00") + "Z"


def run_finished(run: RunResult, source: str) -> Event:
    """`dev.hopwatch.run.finished`: the run's summary as `/api/v1/runs` gives it, with the
    broken step's message; id the run's id."""
    broken = run.broken
    data = summary_of(run).model_dump(mode="json")
    data["message"] = broken.message if broken else None  # redacted by the runner
    subject = f"{run.flow}/{run.variant}"
    at = run.started_at + run.duration_s
    return _event(RUN_FINISHED, run.run_id, source, subject, at, data)


def incident_event(transition: Transition, incident: Incident, source: str) -> Event:
    """`dev.hopwatch.incident.<transition>`: the incident as the API shows it, at that moment.

    The id is the incident's id, the transition and its flap count: unique per source (an
    incident opens once, and each reopening counts a flap), and the same if sent again.
    """
    status = "open" if incident.is_open else "closed"
    data = IncidentView(**incident.to_row(), status=status).model_dump(mode="json")
    if transition == "closed" and incident.closed_at is not None:
        at = incident.closed_at
    elif transition == "opened":
        at = incident.opened_at
    else:
        at = incident.last_failure_at
    subject = "/".join(incident.link)
    event_id = f"{incident.id}/{transition}/{incident.flaps}"
    return _event(INCIDENT_PREFIX + transition, event_id, source, subject, at, data)


def _event(
    type_: str, event_id: str, source: str, subject: str, at: float, data: dict[str, Any]
) -> Event:
    envelope = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": type_,
        "subject": subject,
        "time": rfc3339(at),
        "datacontenttype": "application/json",
        "data": data,
    }
    value = json.dumps(envelope, separators=(",", ":"), allow_nan=False).encode()
    return Event(type_, subject.encode(), value)
