"""The Correlator: registers expectations, classifies and counts every arrival, ages its tables."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush
from itertools import count
from typing import Final, Literal

from monitor.correlator.expectation import (
    KEEP_DUPLICATES,
    Expectation,
    State,
    accepts,
    keys_of,
    run_keys_of,
    without_body,
)
from monitor.correlator.tables import Expectations, Table, Texts, carries
from monitor.metric_types import LabelledCounter, incrementer
from probes.arrivals import Arrival

log = logging.getLogger(__package__)  # "monitor.correlator", the name it logged under before

Outcome = Literal["matched", "unmatched", "duplicate", "late"]
OUTCOMES: Final = ("matched", "unmatched", "duplicate", "late", "bad_signature", "malformed")
EARLY: Final = "early"
_MAX_ID_LEN: Final = 128  # longer delivery ids are kept as a digest, to bound the id table


class CorrelatorOverflow(RuntimeError):
    """The pending table is full: an internal error (an overloaded monitor), not the target's."""


@dataclass(slots=True)
class _Early:
    arrival: Arrival
    kept_at: float
    duplicates: list[Arrival] = field(default_factory=list)


class Correlator:
    """Hands arrivals to waiting expectations; see the package docstring for the rules."""

    def __init__(
        self,
        arrivals_counter: LabelledCounter | None = None,
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
        self._pending = Expectations()
        self._early: Table[_Early] = Table()
        self._finished = Expectations()
        self._registered: dict[str, int] = {}  # channel -> expectations without a matcher yet
        # _id_key (channel and delivery id) -> the seq of whoever holds its first arrival (an
        # expectation or a kept early arrival; seqs are unique across tables), or None
        self._ids: OrderedDict[str, int | None] = OrderedDict()
        self._channel_seen: dict[str, int] = {}
        # channel -> (why, a signature refusal?) -> deliveries the receiver refused there
        # (never offered): an expectation compares with the tally at its registration
        self._refused: dict[str, dict[tuple[str, bool], int]] = {}
        # the counter's increment per label pair (metric_types.incrementer)
        self._children: dict[tuple[str, str], Callable[[], None]] = {}
        self.overflow: dict[str, int] = {"pending": 0, "early": 0, "late": 0, "delivery_ids": 0}
        # (deadline, seq) of waiting expectations (and of some finished since), a heap under
        # one loop timer set for the earliest (`_watch`)
        self._deadlines: list[tuple[float, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._purge_at = math.inf  # no finished expectation ages out before then (`purge`)

    # -- the waiting side ------------------------------------------------------------------

    def expect(self, channel: str, run_id: str, step: str, deadline: float) -> Expectation:
        """Register a step's expectation at run start; `deadline` (monotonic) is provisional."""
        if len(self._pending.entries) >= self.max_pending:
            self._drop_stale_pending(time.monotonic())
        if len(self._pending.entries) >= self.max_pending:
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

    def _begin_wait(self, expectation: Expectation) -> Arrival | asyncio.Future[Arrival]:
        """`Expectation.wait`'s first half, its matcher set: the kept arrival it claims, else
        the future it waits on, indexed for arrivals to come and expired at its deadline. One
        call, not the four (with theirs) it takes one at a time: `_claim_early`,
        `_start_waiting`, `_flush_unclaimable`, `_watch`."""
        channel = expectation.channel
        early = self._early.channels
        if channel in early:
            claimed = self._claim_early(expectation)
            if claimed is not None:
                return claimed
        # `_start_waiting`'s steps
        if expectation.state == "registered":  # the test `_leave_registered` makes first
            self._leave_registered(expectation)
        self._pending.index.add(expectation, expectation.seq)  # first registered wins
        expectation.state = "waiting"
        if channel not in self._registered and channel in early:  # _flush_unclaimable's test
            self._flush_unclaimable(channel)
        future: asyncio.Future[Arrival] = asyncio.get_running_loop().create_future()
        expectation._future = future
        self._watch(expectation)
        return future

    def _leave_registered(self, expectation: Expectation) -> None:
        if expectation.state != "registered":
            return
        left = self._registered[expectation.channel] - 1
        if left:
            self._registered[expectation.channel] = left
        else:
            del self._registered[expectation.channel]

    def _drop_pending(self, expectation: Expectation, state: State, flush: bool = True) -> None:
        if expectation.state == "registered":  # the test `_leave_registered` makes first
            self._leave_registered(expectation)
        expectation.state = state
        self._pending.pop(expectation.seq)
        if flush:
            channel = expectation.channel  # `_flush_unclaimable`'s test first, without its calls
            if channel not in self._registered and channel in self._early.channels:
                self._flush_unclaimable(channel)

    def _claim_early(self, expectation: Expectation) -> Arrival | None:
        """Hand `expectation` the oldest kept arrival it matches; other matches are duplicates."""
        if not self._early.holds(expectation.channel):
            return None
        matching = [
            (seq, kept)
            for seq, kept in self._early.channel(expectation.channel)
            if accepts(expectation, kept.arrival)
        ]
        if not matching:
            self._note_kept_near_misses(expectation)
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

    def _note_kept_near_misses(self, expectation: Expectation) -> None:
        """Kept arrivals that carry one of the expectation's keys but that it refused."""
        keys = keys_of(expectation.match)
        if len(keys) < 2:  # one key: carrying it is matching it
            return
        run_keys = run_keys_of(expectation.match)
        for _, kept in self._early.channel(expectation.channel):
            if carries(Texts(kept.arrival), run_keys):
                expectation._near_miss(kept.arrival)

    def _watch(self, expectation: Expectation) -> None:
        """Expire a waiting `expectation` at its deadline. One loop timer serves them all, set
        for the earliest: a timer per waiting step was a loop handle made and cancelled per
        run (~1.5 % of a webhook run's instructions). A fulfilled one's entry is dropped when it
        comes first, or when stale entries outnumber the pending expectations."""
        deadlines = self._deadlines
        if len(deadlines) > 2 * len(self._pending.entries) + 64:
            deadlines[:] = [
                (e.deadline, seq) for seq, e in self._pending.items() if e.state == "waiting"
            ]
            heapify(deadlines)
        heappush(deadlines, (expectation.deadline, expectation.seq))
        if expectation.deadline < self._timer_at:
            self._arm(expectation.deadline)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        delay = max(0.0, at - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire_due)

    def _expire_due(self) -> None:
        """The timer's callback: expire what is due, drop stale entries, set it for the next."""
        self._timer, self._timer_at = None, math.inf
        now = time.monotonic()
        deadlines, pending = self._deadlines, self._pending
        while deadlines:
            at, seq = deadlines[0]
            expectation = pending.get(seq)
            waiting = expectation is not None and expectation.state == "waiting"
            if waiting and at > now:
                self._arm(at)
                return
            heappop(deadlines)
            if waiting:
                assert expectation is not None
                self._expire(expectation)

    def _expire(self, expectation: Expectation) -> None:
        if expectation.state not in ("registered", "waiting"):
            return
        self._finish(expectation, "expired")
        future = expectation._future
        if future is not None and not future.done():
            future.set_exception(expectation._not_received())

    def _finish(
        self, expectation: Expectation, state: State, flush: bool = True, now: float | None = None
    ) -> None:
        """Move to the finished table, where it turns later matches into duplicate or late;
        `now` (monotonic) when the caller has just read it."""
        self._drop_pending(expectation, state, flush)
        expectation.finished_at = time.monotonic() if now is None else now
        finished = self._finished.entries
        if len(finished) >= self.max_late and finished:  # push the oldest out: the first seq
            self._finished.pop(next(iter(finished)))
            self.overflow["late"] += 1
        self._finished.add(expectation.seq, expectation.channel, expectation)
        if self._purge_at == math.inf:  # the only one: `purge` has work when it is due
            self._purge_at = expectation.finished_at + self.late_memory
        if expectation.match is not None:  # first finished wins, as a scan in age order would
            self._finished.index.add(expectation, next(self._finish_order))

    # -- the arriving side -----------------------------------------------------------------

    def offer(self, arrival: Arrival) -> str:
        """Classify and count `arrival`, waking its waiter; never blocks. Returns the outcome
        counted, or "early" when it is kept for a waiter still to come (counted later)."""
        now = time.monotonic()
        if self._early.entries or now >= self._purge_at:  # else nothing is due to age out
            self.purge(now)
        self._channel_seen[arrival.channel] = self._channel_seen.get(arrival.channel, 0) + 1
        id_key = _id_key(arrival)
        if id_key is not None and id_key in self._ids:
            self._ids.move_to_end(id_key)
            self._note_id_duplicate(self._ids[id_key], arrival)
            return self._count(arrival, "duplicate")
        texts = Texts(arrival)
        finished = self._finished.index.find(texts)
        if finished is not None:
            self._hold_key(id_key, None)
            if finished.state == "fulfilled":
                finished._add_duplicate(arrival)
                return self._count(arrival, "duplicate")
            return self._count(arrival, "late")
        waiter = self._pending.index.find(texts)
        if waiter is not None:
            self._finish(waiter, "fulfilled", now=now)
            waiter._fulfil(arrival)
            self._hold_key(id_key, waiter.seq)
            return self._count(arrival, "matched")
        self._note_near_misses(texts)
        if not self._claimable(arrival.channel):
            self._hold_key(id_key, None)
            return self._count(arrival, "unmatched")
        return self._keep_early(arrival, now)

    def refused(self, channel: str, why: str, *, signature: bool) -> None:
        """A receiver refused a delivery on `channel` (`why`: bad signature, stale timestamp,
        wrong content type, ...; `signature`: refused as not authentic). Not offered, not
        counted here (the receiver counts it): kept as a tally so a step that saw nothing else
        can say what really broke."""
        tally = self._refused.get(channel)
        if tally is None:
            tally = self._refused[channel] = {}
        key = (why, signature)
        tally[key] = tally.get(key, 0) + 1

    def _note_near_misses(self, texts: Texts) -> None:
        """Waiting expectations whose key this arrival carries but whose matcher refused it:
        their run's record came and was wrong, which is not the same as never coming."""
        for expectation in self._pending.index.near(texts):
            expectation._near_miss(texts.arrival)

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
        if kept is not None and len(kept.duplicates) < KEEP_DUPLICATES:
            kept.duplicates.append(without_body(arrival))

    def _hold_id(self, arrival: Arrival, holder: int | None) -> None:
        self._hold_key(_id_key(arrival), holder)

    def _hold_key(self, id_key: str | None, holder: int | None) -> None:
        """Remember an arrival's delivery id (its `_id_key`, None for none) as held by `holder`."""
        if id_key is None:
            return
        ids = self._ids
        ids[id_key] = holder
        ids.move_to_end(id_key)
        while len(ids) > self.max_delivery_ids:
            ids.popitem(last=False)
            self.overflow["delivery_ids"] += 1

    def _count(self, arrival: Arrival, outcome: Outcome) -> Outcome:
        if self._counter is not None:
            # A record that is not JSON and that nobody claimed is poison, not a stray.
            counted = (
                "malformed" if outcome == "unmatched" and arrival.meta.get("not_json") else outcome
            )
            labels = (arrival.source, counted)
            inc = self._children.get(labels)
            if inc is None:  # labels() costs more than the increment: look it up once
                inc = self._children[labels] = incrementer(
                    self._counter, source=arrival.source, outcome=counted
                )
            inc()
        return outcome

    # -- housekeeping ----------------------------------------------------------------------

    def purge(self, now: float | None = None) -> None:
        """Age out early arrivals (counted unmatched) and finished expectations."""
        now = time.monotonic() if now is None else now
        early, finished = self._early, self._finished
        while (
            early
            and (oldest := early.oldest()) is not None
            and (oldest[1].kept_at + self.early_ttl <= now)
        ):
            self._drop_early(oldest[0])
        while (done := finished.oldest()) is not None and (
            done[1].finished_at + self.late_memory <= now
        ):
            finished.pop(done[0])
        # when the oldest finished one will age out (later ones finished later); one taken out
        # otherwise only makes this early, which costs a needless purge
        self._purge_at = math.inf if done is None else done[1].finished_at + self.late_memory

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
