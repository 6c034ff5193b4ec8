"""Matches arrivals (webhooks, Kafka records) to the run steps waiting for them, in bounded memory.

How it fits together:

- At run start a waiting kind calls `expect(channel, run_id, step, deadline)`; the matcher is
  not known yet (it may use values extracted by earlier steps). When the step runs it calls
  `Expectation.wait(match)`, which first claims a kept early arrival, else sleeps until an
  arrival matches or the deadline passes (then `probes.errors.NotReceived`).
- Receivers call `offer(arrival)`, which never blocks, and classify each arrival:

  duplicate   its delivery id was seen before (bounded LRU), or it matches an expectation that
              was already fulfilled (remembered for `late_memory` seconds);
  late        it matches an expectation whose deadline passed: never credited to a later run,
              even if a later run's matcher would accept it too;
  matched     a waiting expectation's matcher accepts it (first registered wins);
  early       no waiter accepts it yet, but some expectation on the channel is registered
              without a matcher: kept for `early_ttl` seconds for it to claim;
  unmatched   nobody can claim it (no registered expectation left on the channel), or it was
              kept early and nobody claimed it in time, or it was pushed out of a full table.

Counting: every arrival is counted exactly once in `hopwatch_arrivals_total{source,outcome}`.
`offer` returns the outcome it counted, or "early" when it counted nothing yet: the kept arrival
is counted later, `matched` when a waiter claims it, `duplicate` when a waiter claims another
matching one first, `unmatched` when it ages out, is evicted or can no longer be claimed.

Bounds: pending expectations (`max_pending`; a full table refuses `expect` with
CorrelatorOverflow, an internal error), early arrivals (`max_early`,
`max_early_bytes`, `early_ttl`), finished
expectations remembered for late/duplicate detection (`max_late`, `late_memory`) and delivery
ids (`max_delivery_ids`). Every overflow is counted in `Correlator.overflow`, never raised from
`offer`. Call `purge()` (or run `janitor()` as a task) so ageing happens without traffic too.

Matching: matchers must be cheap and total. A matcher that also has `keys` (an IndexedMatcher:
equalities it requires, as `(selector, text)` pairs) is indexed, per channel, under one of them,
so an arrival reads each selector once and runs only the matchers filed under what it holds;
a matcher without keys is checked against every arrival on its channel.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import count
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, Protocol, TypeVar

from probes.errors import NotReceived

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)

Outcome = Literal["matched", "unmatched", "duplicate", "late"]
OUTCOMES: Final = ("matched", "unmatched", "duplicate", "late", "bad_signature", "malformed")
EARLY: Final = "early"
_KEEP_DUPLICATES: Final = 1  # a step reports the first duplicate; duplicate_count has the rest
_MAX_ID_LEN: Final = 128  # longer delivery ids are kept as a digest, to bound the id table

T = TypeVar("T")


@dataclass(slots=True)
class Arrival:
    """Something that reached the monitor from outside: a webhook request or a Kafka record."""

    source: Literal["webhook", "kafka"]
    channel: str  # the webhook path, or "<cluster>/<topic>"
    received_at: float  # monotonic seconds
    received_unix: float
    headers: Mapping[str, str]
    body: bytes
    json: Any | None
    delivery_id: str | None
    key: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)


Matcher = Callable[[Arrival], bool]
State = Literal["registered", "waiting", "fulfilled", "expired", "cancelled"]


class Selector(Hashable, Protocol):
    """A place an IndexedMatcher looks in an arrival; equal selectors must read the same place."""

    def texts(self, arrival: Arrival) -> Collection[str]:
        """The texts `arrival` holds there: for every key `(self, text)` of a matcher that
        accepts `arrival`, `text` must be among them (more is fine: matchers confirm)."""
        ...


class IndexedMatcher(Protocol):
    """A Matcher that names equalities it requires, so the correlator can index it."""

    keys: tuple[tuple[Selector, str], ...]

    def __call__(self, arrival: Arrival) -> bool: ...


class CorrelatorOverflow(RuntimeError):
    """The pending table is full: an internal error (an overloaded monitor), not the target's."""


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
        "_order",
        "_owner",
        "_seen_on_channel",
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
        self, owner: Correlator, seq: int, channel: str, run_id: str, step: str, deadline: float
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
        self._seen_on_channel = 0
        self._keys: tuple[_Key, ...] | None = None  # the matcher's, once read
        # where an index holds it: its order there and the key it is filed under
        self._order = -1
        self._filed: _Key | None = None

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
        if self.state != "registered":
            raise RuntimeError(f"wait() on an expectation that is {self.state}")
        if deadline is not None:
            self.deadline = deadline
        self.match = match
        self._seen_on_channel = self._owner._channel_seen.get(self.channel, 0)
        claimed = self._owner._claim_early(self)
        if claimed is not None:
            return claimed
        loop = asyncio.get_running_loop()
        self._owner._start_waiting(self)
        self.state = "waiting"
        self._owner._flush_unclaimable(self.channel)
        self._future = loop.create_future()
        timer = loop.call_later(
            max(0.0, self.deadline - time.monotonic()), self._owner._expire, self
        )
        try:
            return await self._future
        finally:
            timer.cancel()
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

    def _fulfil(self, arrival: Arrival) -> None:
        self.state = "fulfilled"
        self.delivery_id = arrival.delivery_id
        if self._future is not None and not self._future.done():
            self._future.set_result(arrival)

    def _add_duplicate(self, arrival: Arrival) -> None:
        self.duplicate_count += 1
        remembered = _without_body(arrival)
        if self._duplicates is None:
            self._duplicates = []
        if len(self._duplicates) < _KEEP_DUPLICATES:
            self._duplicates.append(remembered)
        if self._dup_future is not None and not self._dup_future.done():
            self._dup_future.set_result(remembered)

    def _not_received(self) -> NotReceived:
        others = self._owner._channel_seen.get(self.channel, 0) - self._seen_on_channel
        seen = f" ({others} other arrival(s) on it did not match)" if others else ""
        return NotReceived(f"nothing matching arrived on {self.channel} by the deadline{seen}")


class _Table(Generic[T]):
    """Items in insertion order (for ageing, eviction) with an index by channel (for matching)."""

    def __init__(self) -> None:
        self._all: OrderedDict[int, tuple[str, T]] = OrderedDict()
        self._by_channel: dict[str, dict[int, T]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def add(self, seq: int, channel: str, item: T) -> None:
        self._all[seq] = (channel, item)
        self._by_channel.setdefault(channel, {})[seq] = item

    def pop(self, seq: int) -> T | None:
        entry = self._all.pop(seq, None)
        if entry is None:
            return None
        channel, item = entry
        bucket = self._by_channel[channel]
        del bucket[seq]
        if not bucket:  # keep the index as small as the table
            del self._by_channel[channel]
        return item

    def get(self, seq: int) -> T | None:
        entry = self._all.get(seq)
        return None if entry is None else entry[1]

    def oldest(self) -> tuple[int, T] | None:
        first = next(iter(self._all.items()), None)
        return None if first is None else (first[0], first[1][1])

    def channel(self, channel: str) -> list[tuple[int, T]]:
        return list(self._by_channel.get(channel, {}).items())

    def holds(self, channel: str) -> bool:
        return channel in self._by_channel

    def items(self) -> Iterator[tuple[int, T]]:
        return ((seq, item) for seq, (_, item) in list(self._all.items()))


_Key = tuple[Selector, str]


class _Texts:
    """One arrival's texts per selector, each read once however many expectations ask."""

    __slots__ = ("_read", "arrival")

    def __init__(self, arrival: Arrival) -> None:
        self.arrival = arrival
        self._read: dict[Selector, Collection[str] | None] = {}

    def get(self, selector: Selector) -> Collection[str] | None:
        """The texts at `selector`, or None when reading them failed (then scan its buckets)."""
        try:
            return self._read[selector]
        except KeyError:
            pass
        texts: Collection[str] | None
        try:
            texts = selector.texts(self.arrival)
        except Exception:
            log.exception("selector %r failed on an arrival", selector)
            texts = None
        self._read[selector] = texts
        return texts


_Bucket = Expectation | dict[int, Expectation]  # one, or several by order


@dataclass(slots=True)
class _ChannelIndex:
    """One channel's indexed expectations: each filed under one key, or unkeyed. Where each
    is filed lives on the expectation (`_order`, `_filed`): an expectation is in at most one
    index at a time, and no object per entry is made."""

    buckets: dict[_Key, _Bucket] = field(default_factory=dict)
    selectors: dict[Selector, int] = field(default_factory=dict)  # selector → items under it
    unkeyed: dict[int, Expectation] = field(default_factory=dict)
    size: int = 0

    def add(self, expectation: Expectation, order: int, keys: tuple[_Key, ...]) -> None:
        # File under the key whose bucket is smallest now: a key every run shares (an event
        # type) fills its bucket at once, so later expectations go under their own value.
        if len(keys) > 1:
            key: _Key | None = min(keys, key=self._bucket_size)
        else:
            key = keys[0] if keys else None
        expectation._order, expectation._filed = order, key
        self.size += 1
        if key is None:
            self.unkeyed[order] = expectation
            return
        held = self.buckets.get(key)
        if held is None:
            self.buckets[key] = expectation
        elif isinstance(held, Expectation):
            self.buckets[key] = {held._order: held, order: expectation}
        else:
            held[order] = expectation
        self.selectors[key[0]] = self.selectors.get(key[0], 0) + 1

    def _bucket_size(self, key: _Key) -> int:
        held = self.buckets.get(key)
        return 0 if held is None else 1 if isinstance(held, Expectation) else len(held)

    def discard(self, expectation: Expectation) -> None:
        """Take `expectation` out; the caller knows it is filed here."""
        order, key = expectation._order, expectation._filed
        expectation._order, expectation._filed = -1, None
        self.size -= 1
        if key is None:
            del self.unkeyed[order]
            return
        held = self.buckets[key]
        if isinstance(held, Expectation):
            del self.buckets[key]
        else:
            del held[order]
            if len(held) == 1:
                self.buckets[key] = next(iter(held.values()))
        left = self.selectors[key[0]] - 1
        if left:
            self.selectors[key[0]] = left
        else:
            del self.selectors[key[0]]

    def candidates(self, texts: _Texts) -> Iterator[_Bucket]:
        """The buckets an arrival may match in, unkeyed ones last."""
        for selector in list(self.selectors):
            found = texts.get(selector)
            if found is None:
                yield from [b for k, b in self.buckets.items() if k[0] == selector]
                continue
            for text in found:
                held = self.buckets.get((selector, text))
                if held is not None:
                    yield held
        if self.unkeyed:
            yield self.unkeyed

    def expectations(self) -> Iterator[Expectation]:
        for held in self.buckets.values():
            yield from [held] if isinstance(held, Expectation) else held.values()
        yield from self.unkeyed.values()


class _Index:
    """A table's expectations that have a matcher, per channel, found by their matcher's keys.

    Each is filed under one key it requires (or unkeyed), with an order: the first accepting
    expectation in that order wins, as a scan of the table in that order would find."""

    def __init__(self) -> None:
        self._channels: dict[str, _ChannelIndex] = {}

    def add(self, expectation: Expectation, order: int) -> None:
        index = self._channels.get(expectation.channel)
        if index is None:
            index = self._channels[expectation.channel] = _ChannelIndex()
        keys = expectation._keys
        if keys is None:
            keys = expectation._keys = _keys_of(expectation.match)
        index.add(expectation, order, keys)

    def discard(self, expectation: Expectation) -> None:
        if expectation._order < 0:  # not indexed: no matcher (yet)
            return
        index = self._channels[expectation.channel]
        index.discard(expectation)
        if not index.size:  # keep the index as small as the table
            del self._channels[expectation.channel]

    def find(self, texts: _Texts) -> Expectation | None:
        """The first expectation (lowest order) whose matcher accepts the arrival."""
        index = self._channels.get(texts.arrival.channel)
        if index is None:
            return None
        best: Expectation | None = None
        for held in index.candidates(texts):
            for candidate in [held] if isinstance(held, Expectation) else list(held.values()):
                if (best is None or candidate._order < best._order) and _accepts(
                    candidate, texts.arrival
                ):
                    best = candidate
        return best

    def seqs(self) -> set[int]:
        """The seqs of the expectations indexed, for tests of the index's consistency."""
        return {e.seq for index in self._channels.values() for e in index.expectations()}


class _Expectations(_Table[Expectation]):
    """A table of expectations with an index of those that have a matcher, kept in step."""

    def __init__(self) -> None:
        super().__init__()
        self.index = _Index()

    def pop(self, seq: int) -> Expectation | None:
        item = super().pop(seq)
        if item is not None:
            self.index.discard(item)
        return item


@dataclass(slots=True)
class _Early:
    arrival: Arrival
    kept_at: float
    duplicates: list[Arrival] = field(default_factory=list)


class Correlator:
    """Hands arrivals to waiting expectations; see the module docstring for the rules."""

    def __init__(
        self,
        arrivals_counter: Counter | None = None,
        *,
        early_ttl: float = 30.0,
        max_pending: int = 10_000,
        max_early: int = 10_000,
        late_memory: float = 600.0,
        max_late: int = 10_000,
        max_delivery_ids: int = 100_000,
        max_early_bytes: int = 64 * 2**20,
    ) -> None:
        self._counter = arrivals_counter
        self.early_ttl = early_ttl
        self.max_pending = max_pending
        self.max_early = max_early
        self.late_memory = late_memory
        self.max_late = max_late
        self.max_delivery_ids = max_delivery_ids
        self.max_early_bytes = max_early_bytes
        self._early_bytes = 0
        self._seq = count()
        self._finish_order = count()
        self._pending = _Expectations()
        self._early: _Table[_Early] = _Table()
        self._finished = _Expectations()
        self._registered: dict[str, int] = {}  # channel -> expectations without a matcher yet
        # _id_key (channel and delivery id) -> the seq of whoever holds its first arrival (an
        # expectation or a kept early arrival; seqs are unique across tables), or None
        self._ids: OrderedDict[str, int | None] = OrderedDict()
        self._channel_seen: dict[str, int] = {}
        self._children: dict[tuple[str, str], Any] = {}  # the counter's child per label pair
        self.overflow: dict[str, int] = {"pending": 0, "early": 0, "late": 0, "delivery_ids": 0}

    # -- the waiting side ------------------------------------------------------------------

    def expect(self, channel: str, run_id: str, step: str, deadline: float) -> Expectation:
        """Register a step's expectation at run start; `deadline` (monotonic) is provisional."""
        if len(self._pending) >= self.max_pending:
            self._drop_stale_pending(time.monotonic())
        if len(self._pending) >= self.max_pending:
            self.overflow["pending"] += 1
            raise CorrelatorOverflow(
                f"{len(self._pending)} expectations pending, the limit is {self.max_pending}"
            )
        expectation = Expectation(self, next(self._seq), channel, run_id, step, deadline)
        self._pending.add(expectation.seq, channel, expectation)
        self._registered[channel] = self._registered.get(channel, 0) + 1
        return expectation

    def _drop_stale_pending(self, now: float) -> None:
        """Registrations never waited on nor cancelled past their deadline: a runner's leak."""
        for _, expectation in self._pending.items():
            if expectation.state == "registered" and expectation.deadline < now:
                self._drop_pending(expectation, "cancelled")
                log.warning("dropped stale expectation %r (never waited on)", expectation)

    def _start_waiting(self, expectation: Expectation) -> None:
        """The matcher is known and no kept arrival matched: index it for arrivals to come."""
        self._leave_registered(expectation)
        self._pending.index.add(expectation, expectation.seq)  # first registered wins

    def _leave_registered(self, expectation: Expectation) -> None:
        if expectation.state != "registered":
            return
        left = self._registered[expectation.channel] - 1
        if left:
            self._registered[expectation.channel] = left
        else:
            del self._registered[expectation.channel]

    def _drop_pending(self, expectation: Expectation, state: State, flush: bool = True) -> None:
        self._leave_registered(expectation)
        expectation.state = state
        self._pending.pop(expectation.seq)
        if flush:
            self._flush_unclaimable(expectation.channel)

    def _claim_early(self, expectation: Expectation) -> Arrival | None:
        """Hand `expectation` the oldest kept arrival it matches; other matches are duplicates."""
        if not self._early.holds(expectation.channel):
            return None
        matching = [
            (seq, kept)
            for seq, kept in self._early.channel(expectation.channel)
            if _accepts(expectation, kept.arrival)
        ]
        if not matching:
            return None
        for seq, _ in matching:
            self._forget_early(seq)
        claimed = matching[0][1].arrival
        self._finish(expectation, "fulfilled", flush=False)
        expectation._fulfil(claimed)
        self._hold_id(claimed, expectation.seq)
        self._count(claimed, "matched")
        for _, kept in matching[1:]:
            self._hold_id(kept.arrival, None)
            self._count(kept.arrival, "duplicate")
            expectation._add_duplicate(kept.arrival)
        for _, kept in matching:  # id-duplicates that came while they were kept
            for duplicate in kept.duplicates:
                expectation._add_duplicate(duplicate)
        self._flush_unclaimable(expectation.channel)
        return claimed

    def _expire(self, expectation: Expectation) -> None:
        if expectation.state not in ("registered", "waiting"):
            return
        self._finish(expectation, "expired")
        future = expectation._future
        if future is not None and not future.done():
            future.set_exception(expectation._not_received())

    def _finish(self, expectation: Expectation, state: State, flush: bool = True) -> None:
        """Move to the finished table, where it turns later matches into duplicate or late."""
        self._drop_pending(expectation, state, flush)
        expectation.finished_at = time.monotonic()
        if len(self._finished) >= self.max_late:
            oldest = self._finished.oldest()
            if oldest is not None:
                self._finished.pop(oldest[0])
                self.overflow["late"] += 1
        self._finished.add(expectation.seq, expectation.channel, expectation)
        if expectation.match is not None:  # first finished wins, as a scan in age order would
            self._finished.index.add(expectation, next(self._finish_order))

    # -- the arriving side -----------------------------------------------------------------

    def offer(self, arrival: Arrival) -> str:
        """Classify and count `arrival`, waking its waiter; never blocks. Returns the outcome
        counted, or "early" when it is kept for a waiter still to come (counted later)."""
        now = time.monotonic()
        self.purge(now)
        self._channel_seen[arrival.channel] = self._channel_seen.get(arrival.channel, 0) + 1
        id_key = _id_key(arrival)
        if id_key is not None and id_key in self._ids:
            self._ids.move_to_end(id_key)
            self._note_id_duplicate(self._ids[id_key], arrival)
            return self._count(arrival, "duplicate")
        texts = _Texts(arrival)
        finished = self._finished.index.find(texts)
        if finished is not None:
            self._hold_id(arrival, None)
            if finished.state == "fulfilled":
                finished._add_duplicate(arrival)
                return self._count(arrival, "duplicate")
            return self._count(arrival, "late")
        waiter = self._pending.index.find(texts)
        if waiter is not None:
            self._finish(waiter, "fulfilled")
            waiter._fulfil(arrival)
            self._hold_id(arrival, waiter.seq)
            return self._count(arrival, "matched")
        if not self._claimable(arrival.channel):
            self._hold_id(arrival, None)
            return self._count(arrival, "unmatched")
        return self._keep_early(arrival, now)

    def _claimable(self, channel: str) -> bool:
        """Whether an expectation without a matcher yet could still claim an arrival here."""
        return channel in self._registered

    def _keep_early(self, arrival: Arrival, now: float) -> str:
        size = len(arrival.body)
        while self._early and (
            len(self._early) >= self.max_early or self._early_bytes + size > self.max_early_bytes
        ):
            oldest = self._early.oldest()
            if oldest is None:
                break
            self.overflow["early"] += 1
            self._drop_early(oldest[0])
        seq = next(self._seq)
        self._early.add(seq, arrival.channel, _Early(arrival, now))
        self._early_bytes += size
        self._hold_id(arrival, seq)
        return EARLY

    def _forget_early(self, seq: int) -> _Early | None:
        kept = self._early.pop(seq)
        if kept is not None:
            self._early_bytes -= len(kept.arrival.body)
        return kept

    def _drop_early(self, seq: int) -> None:
        kept = self._forget_early(seq)
        if kept is None:
            return
        id_key = _id_key(kept.arrival)
        if id_key is not None and id_key in self._ids:
            self._ids[id_key] = None
        self._count(kept.arrival, "unmatched")

    def _flush_unclaimable(self, channel: str) -> None:
        """Count kept arrivals as unmatched as soon as no expectation can claim them any more."""
        if self._claimable(channel) or not self._early.holds(channel):
            return
        for seq, _ in self._early.channel(channel):
            self._drop_early(seq)

    def _note_id_duplicate(self, holder: int | None, arrival: Arrival) -> None:
        if holder is None:
            return
        expectation = self._finished.get(holder)
        if expectation is not None:
            expectation._add_duplicate(arrival)
            return
        kept = self._early.get(holder)
        if kept is not None and len(kept.duplicates) < _KEEP_DUPLICATES:
            kept.duplicates.append(_without_body(arrival))

    def _hold_id(self, arrival: Arrival, holder: int | None) -> None:
        id_key = _id_key(arrival)
        if id_key is None:
            return
        self._ids[id_key] = holder
        self._ids.move_to_end(id_key)
        while len(self._ids) > self.max_delivery_ids:
            self._ids.popitem(last=False)
            self.overflow["delivery_ids"] += 1

    def _count(self, arrival: Arrival, outcome: Outcome) -> Outcome:
        if self._counter is not None:
            labels = (arrival.source, outcome)
            child = self._children.get(labels)
            if child is None:  # labels() costs more than the increment: look it up once
                child = self._children[labels] = self._counter.labels(
                    source=arrival.source, outcome=outcome
                )
            child.inc()
        return outcome

    # -- housekeeping ----------------------------------------------------------------------

    def purge(self, now: float | None = None) -> None:
        """Age out early arrivals (counted unmatched) and finished expectations."""
        now = time.monotonic() if now is None else now
        while (oldest := self._early.oldest()) is not None and (
            oldest[1].kept_at + self.early_ttl <= now
        ):
            self._drop_early(oldest[0])
        while (done := self._finished.oldest()) is not None and (
            done[1].finished_at + self.late_memory <= now
        ):
            self._finished.pop(done[0])

    async def janitor(self, every: float = 1.0) -> None:
        """Purge forever, so unmatched arrivals are counted even when no traffic comes."""
        while True:
            await asyncio.sleep(every)
            self.purge()

    def stats(self) -> dict[str, int]:
        """Table sizes and overflow counts, for the lead's metrics and for tests."""
        return {
            "pending": len(self._pending),
            "early": len(self._early),
            "early_bytes": self._early_bytes,
            "finished": len(self._finished),
            "delivery_ids": len(self._ids),
            **{f"overflow_{k}": v for k, v in self.overflow.items()},
        }


def _accepts(expectation: Expectation, arrival: Arrival) -> bool:
    """Run a step's matcher; a matcher that raises is a non-match, never a receiver crash."""
    if expectation.match is None:
        return False
    try:
        return bool(expectation.match(arrival))
    except Exception:
        log.exception("matcher of %r failed", expectation)
        return False


def _keys_of(match: Matcher | None) -> tuple[_Key, ...]:
    """An IndexedMatcher's keys; none (so it is checked against every arrival) for a plain
    matcher or keys of the wrong shape."""
    keys = getattr(match, "keys", None)
    if not isinstance(keys, tuple):
        return ()
    try:
        hash(keys)
    except Exception:  # an unhashable selector: scan rather than fail the waiter
        return ()
    if all(isinstance(k, tuple) and len(k) == 2 and isinstance(k[1], str) for k in keys):
        return keys
    return ()


def _id_key(arrival: Arrival) -> str | None:
    """The id table's key: the channel and the id (ids are per channel: two senders may share
    a format), joined by a NUL that no path or topic holds. A string, not a tuple: the 100,000
    remembered ids are then nothing for the garbage collector to count or walk (as tuples they
    brought a 67 ms young collection every ~50,000 webhooks). An overlong id is kept as a
    digest."""
    delivery_id = arrival.delivery_id
    if delivery_id is None:
        return None
    if len(delivery_id) > _MAX_ID_LEN:
        delivery_id = "sha256:" + hashlib.sha256(delivery_id.encode("utf-8", "replace")).hexdigest()
    return f"{arrival.channel}\0{delivery_id}"


def _without_body(arrival: Arrival) -> Arrival:
    """A duplicate as remembered: who and when, not the (possibly large) content."""
    return replace(arrival, body=b"", json=None)
