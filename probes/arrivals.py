"""What waiting kinds share with the engine's correlator, kept here so probes never import monitor.

The engine's receivers and shared Kafka consumer turn what reaches the monitor into an
`Arrival` on a channel; its correlator (monitor/correlator) hands each one to the step waiting
for it. A waiting kind sees the correlator only as a `CorrelatorPort` lent through
`StepContext.correlator`: it registers at run start (`expect`) and gets a `Registration`, on
which the step later waits with a `Matcher`. A matcher that names the equalities it requires
(an `IndexedMatcher`, read through `Selector`s) is found by index instead of tried on every
arrival.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from probes.errors import AssertionFailed

__all__ = [
    "Arrival",
    "CloseMatch",
    "CorrelatorPort",
    "IndexedMatcher",
    "Matcher",
    "Registration",
    "Selector",
    "channel_name",
]


@dataclass(slots=True)
class Arrival:
    """Something that reached the monitor from outside: a webhook request or a Kafka record."""

    source: Literal["webhook", "kafka"]
    channel: str  # the webhook path, or `channel_name(cluster, topic)`
    received_at: float  # monotonic seconds
    received_unix: float
    headers: Mapping[str, str]
    body: bytes
    json: Any | None
    delivery_id: str | None
    key: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    xml: Any | None = None  # the parsed (hardened: probes.xml_checks) root of an XML body


def channel_name(cluster: str, topic: str) -> str:
    """The channel a Kafka topic's records arrive on: `<cluster>/<topic>`."""
    return f"{cluster}/{topic}"


Matcher = Callable[[Arrival], bool]


class Selector(Hashable, Protocol):
    """A place an IndexedMatcher looks in an arrival; equal selectors must read the same place."""

    def texts(self, arrival: Arrival) -> Collection[str]:
        """The texts `arrival` holds there: for every key `(self, text)` of a matcher that
        accepts `arrival`, `text` must be among them (more is fine: matchers confirm)."""
        ...


class IndexedMatcher(Protocol):
    """A Matcher that names equalities it requires, so the correlator can index it. It may
    also name, in `run_keys`, those of its keys that hold its run's own values (rendered from
    templates): an arrival carrying one of them that the matcher refuses is this run's
    arrival gone wrong, reported as `CloseMatch` instead of not_received."""

    keys: tuple[tuple[Selector, str], ...]

    def __call__(self, arrival: Arrival) -> bool: ...


class CloseMatch(AssertionFailed):
    """Raised by `Registration.wait`: no arrival matched, but `arrival` (the first of
    `message`'s count) carried this run's values and failed the rest of the match rule."""

    def __init__(self, message: str, arrival: Arrival) -> None:
        super().__init__(message)
        self.arrival = arrival


class Registration(Protocol):
    """A step's expectation of one arrival, as the waiting step uses it."""

    async def wait(self, match: Matcher, *, deadline: float | None = None) -> Arrival:
        """The first arrival `match` accepts, kept or still to come; `deadline` (monotonic)
        replaces the provisional one. Raises probes.errors.NotReceived when it passes (or
        CloseMatch, SignatureInvalid or AssertionFailed when what came says more)."""
        ...

    async def duplicate(self, window: float) -> Arrival | None:
        """A second delivery of the arrival taken, if one came or comes within `window`."""
        ...

    def cancel(self) -> None:
        """Give the registration up: the step was skipped or the run aborted."""
        ...


class CorrelatorPort(Protocol):
    """The correlator as a waiting kind reaches it: registration only (the engine offers)."""

    def expect(self, channel: str, run_id: str, step: str, deadline: float) -> Registration:
        """Register a step at run start, before the triggering step runs, so a fast arrival is
        kept for it; `deadline` (monotonic) is provisional."""
        ...
