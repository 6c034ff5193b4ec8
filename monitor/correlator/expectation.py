"""One step's wait for one arrival: the object a waiting kind holds between `expect` and `wait`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Final, Literal, Protocol

from probes.arrivals import Arrival, CloseMatch, Matcher, Selector
from probes.errors import AssertionFailed, NotReceived, SignatureInvalid, StepFailed
from probes.waiting import RuleMatcher

log = logging.getLogger(__package__)  # "monitor.correlator", the name it logged under before

State = Literal["registered", "waiting", "fulfilled", "expired", "cancelled"]
Key = tuple[Selector, str]  # one equality a matcher requires: (where to read, wanted text)
KEEP_DUPLICATES: Final = 1  # a step reports the first duplicate; duplicate_count has the rest


class _Owner(Protocol):
    """What an expectation asks of the correlator that made it (its tables, its timers)."""

    _channel_seen: dict[str, int]
    _refused: dict[str, dict[tuple[str, bool], int]]

    def _begin_wait(self, expectation: Expectation) -> Arrival | asyncio.Future[Arrival]: ...

    def _expire(self, expectation: Expectation) -> None: ...

    def _drop_pending(self, expectation: Expectation, state: State, flush: bool = True) -> None: ...


class Expectation:
    """One step of one run waiting for one arrival on one channel."""

    # Slots: up to `max_late` finished ones live on, and each object the collector tracks
    # makes every full collection longer.
    __slots__ = (
        "_dup_future",
        "_duplicates",
        "_filed",
        "_future",
        "_keys",
        "_near",
        "_near_count",
        "_order",
        "_owner",
        "_refused_at",
        "_seen_at_start",
        "channel",
        "deadline",
        "delivery_id",
        "duplicate_count",
        "finished_at",
        "match",
        "run_id",
        "seq",
        "state",
        "step",
    )

    def __init__(
        self, owner: _Owner, seq: int, channel: str, run_id: str, step: str, deadline: float
    ) -> None:
        self._owner = owner
        self.seq = seq
        self.channel = channel
        self.run_id = run_id
        self.step = step
        self.deadline = deadline  # monotonic
        self.state: State = "registered"
        self.match: Matcher | None = None
        # Only the delivery id and the first duplicate (without its body) are kept: a finished
        # expectation lives on for `late_memory`, and holding bodies that long would defeat
        # the memory bounds.
        self.delivery_id: str | None = None
        self._duplicates: list[Arrival] | None = None  # made for the first one
        self.duplicate_count = 0
        self.finished_at = 0.0
        self._future: asyncio.Future[Arrival] | None = None
        self._dup_future: asyncio.Future[Arrival] | None = None
        # what the receiver had refused on the channel when the run started (a copy only when
        # it refused anything: usually nothing), and arrivals of this run that the matcher
        # refused (the first kept, with its body, only until the expectation finishes)
        self._seen_at_start = owner._channel_seen.get(channel, 0)
        refused = owner._refused.get(channel)
        self._refused_at = None if refused is None else dict(refused)
        self._near: Arrival | None = None
        self._near_count = 0
        self._keys: tuple[Key, ...] | None = None  # the matcher's, once read
        # where an index holds it: its order there and the key it is filed under
        self._order = -1
        self._filed: Key | None = None

    @property
    def duplicates(self) -> list[Arrival]:
        """The first duplicate(s) of this expectation's arrival, remembered without bodies."""
        return [] if self._duplicates is None else self._duplicates

    def __repr__(self) -> str:
        return f"<Expectation {self.channel} run={self.run_id} step={self.step} {self.state}>"

    async def wait(self, match: Matcher, *, deadline: float | None = None) -> Arrival:
        """The first arrival `match` accepts: a kept early one at once, else the next one to come.

        `deadline` (monotonic) replaces the provisional one given to `expect`. Raises
        NotReceived when it passes; later matching arrivals are then counted `late`.
        """
        state = self.state  # (a local: the correlator changes self.state meanwhile)
        if state != "registered":
            raise RuntimeError(f"wait() on an expectation that is {state}")
        if deadline is not None:
            self.deadline = deadline
        self.match = match
        # a kept arrival it claims, or the future to wait on (expired at its deadline by the
        # correlator's one timer)
        begun = self._owner._begin_wait(self)
        if not isinstance(begun, asyncio.Future):
            return begun
        try:
            return await begun
        finally:
            if self.state == "waiting":  # cancelled from outside: later arrivals are late
                self._owner._expire(self)
            self._future = None  # the finished table must not keep the arrival's body alive

    async def duplicate(self, window: float) -> Arrival | None:
        """A second delivery of this expectation's arrival, if one came or comes within `window`."""
        if self.duplicates:
            return self.duplicates[0]
        if window <= 0 or self.state != "fulfilled":
            return None
        self._dup_future = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(self._dup_future, window)
        except TimeoutError:
            return None
        finally:
            self._dup_future = None

    def cancel(self) -> None:
        """For the runner: the step was skipped or the run aborted. A waiter gets CancelledError;
        a known matcher is remembered so its arrival, if it still comes, counts as late."""
        if self.state == "registered":
            self._owner._drop_pending(self, "cancelled")
        elif self.state == "waiting":
            if self._future is not None:
                self._future.cancel()  # before expiring, so the waiter sees CancelledError
            self._owner._expire(self)

    def _near_miss(self, arrival: Arrival) -> None:
        self._near_count += 1
        if self._near is None:
            self._near = arrival

    def _fulfil(self, arrival: Arrival) -> None:
        self._near = None
        self.state = "fulfilled"
        self.delivery_id = arrival.delivery_id
        if self._future is not None and not self._future.done():
            self._future.set_result(arrival)

    def _add_duplicate(self, arrival: Arrival) -> None:
        self.duplicate_count += 1
        remembered = without_body(arrival)
        if self._duplicates is None:
            self._duplicates = []
        if len(self._duplicates) < KEEP_DUPLICATES:
            self._duplicates.append(remembered)
        if self._dup_future is not None and not self._dup_future.done():
            self._dup_future.set_result(remembered)

    def _not_received(self) -> StepFailed:
        """Why nothing matched: this run's arrival came but was wrong (assertion); everything
        that came was refused by the receiver (signature, or assertion when refused for its
        content); else not_received, saying what else came and what was refused."""
        near, self._near = self._near, None
        if near is not None:
            return CloseMatch(
                f"{self._near_count} arrival(s) on {self.channel} carried this run's values "
                "but not all the step matches on",
                near,
            )
        refused = self._refused_since()
        # arrivals on the channel since the run began (this step may have started later)
        others = self._owner._channel_seen.get(self.channel, 0) - self._seen_at_start
        if refused and not others:
            total = sum(refused.values())
            detail = ", ".join(f"{n} {why}" for (why, _), n in refused.items())
            failure = SignatureInvalid if any(sig for _, sig in refused) else AssertionFailed
            return failure(
                f"nothing accepted on {self.channel} by the deadline: {total} "
                f"deliver{'y' if total == 1 else 'ies'} refused ({detail})"
            )
        seen = []
        if others:
            seen.append(f"{others} other arrival(s) on it did not match")
        if refused:
            seen.append(", ".join(f"{n} refused: {why}" for (why, _), n in refused.items()))
        said = f" ({'; '.join(seen)})" if seen else ""
        return NotReceived(f"nothing matching arrived on {self.channel} by the deadline{said}")

    def _refused_since(self) -> dict[tuple[str, bool], int]:
        """The receiver's refusals on the channel since this expectation was registered."""
        now = self._owner._refused.get(self.channel)
        if not now:
            return {}
        before = self._refused_at or {}
        return {k: n - before.get(k, 0) for k, n in now.items() if n > before.get(k, 0)}


def accepts(expectation: Expectation, arrival: Arrival) -> bool:
    """Run a step's matcher; a matcher that raises is a non-match, never a receiver crash."""
    if expectation.match is None:
        return False
    try:
        return bool(expectation.match(arrival))
    except Exception:
        log.exception("matcher of %r failed", expectation)
        return False


def keys_of(match: Matcher | None) -> tuple[Key, ...]:
    """An IndexedMatcher's keys; none (so it is checked against every arrival) for a plain
    matcher or keys of the wrong shape."""
    if type(match) is RuleMatcher and match.keys_are_texts:  # (interned selector, str) pairs
        return match.keys
    keys = getattr(match, "keys", None)
    if not isinstance(keys, tuple):
        return ()
    try:
        hash(keys)
    except Exception:  # an unhashable selector: scan rather than fail the waiter
        return ()
    for k in keys:  # a loop, not all() over a generator: once per waiting step
        if not (isinstance(k, tuple) and len(k) == 2 and isinstance(k[1], str)):
            return ()
    return keys


def run_keys_of(match: Matcher | None) -> tuple[Key, ...]:
    """The keys of a matcher that carry its run's own values (rendered from templates), as
    an IndexedMatcher may name them in `run_keys`; none otherwise."""
    keys = getattr(match, "run_keys", None)
    if not isinstance(keys, tuple):
        return ()
    return tuple(k for k in keys if isinstance(k, tuple) and len(k) == 2)


def without_body(arrival: Arrival) -> Arrival:
    """A duplicate as remembered: who and when, not the (possibly large) content."""
    return replace(arrival, body=b"", json=None)
