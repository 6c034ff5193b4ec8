"""The correlator's tables and the index that finds an arrival's expectation without a scan."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from monitor.correlator.expectation import Expectation, Key, accepts, keys_of, run_keys_of
from probes.arrivals import Arrival, Selector

log = logging.getLogger(__package__)  # "monitor.correlator", the name it logged under before

T = TypeVar("T")


class Table(Generic[T]):
    """Items in insertion order (for ageing, eviction) with an index by channel (for matching)."""

    def __init__(self) -> None:
        self._all: OrderedDict[int, tuple[str, T]] = OrderedDict()
        self._by_channel: dict[str, dict[int, T]] = {}
        # the same dicts, to be read (never changed) by the correlator's hot paths: `len` of
        # `entries` is the table's size without a Python-level __len__ (four a webhook), and
        # `in channels` is `holds` without its call
        self.entries: Mapping[int, tuple[str, T]] = self._all
        self.channels: Mapping[str, Mapping[int, T]] = self._by_channel

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
        for seq, (_, item) in self._all.items():
            return seq, item
        return None

    def channel(self, channel: str) -> list[tuple[int, T]]:
        return list(self._by_channel.get(channel, {}).items())

    def holds(self, channel: str) -> bool:
        return channel in self._by_channel

    def items(self) -> Iterator[tuple[int, T]]:
        return ((seq, item) for seq, (_, item) in list(self._all.items()))


class Texts:
    """One arrival's texts per selector, each read once however many expectations ask."""

    __slots__ = ("_read", "arrival")

    def __init__(self, arrival: Arrival) -> None:
        self.arrival = arrival
        self._read: dict[Selector, Collection[str] | None] = {}

    def get(self, selector: Selector) -> Collection[str] | None:
        """The texts at `selector`, or None when reading them failed (then scan its buckets)."""
        read = self._read
        if selector in read:  # read before (a lookup, not a KeyError: most reads are firsts)
            return read[selector]
        texts: Collection[str] | None
        try:
            texts = selector.texts(self.arrival)
        except Exception:
            log.exception("selector %r failed on an arrival", selector)
            texts = None
        read[selector] = texts
        return texts


def carries(texts: Texts, keys: tuple[Key, ...]) -> bool:
    """Whether the arrival holds the wanted text of any of `keys`."""
    return any(text in (texts.get(selector) or ()) for selector, text in keys)


Bucket = Expectation | dict[int, Expectation]  # one, or several by order


@dataclass(slots=True)
class ChannelIndex:
    """One channel's indexed expectations: each filed under one key, or unkeyed. Where each
    is filed lives on the expectation (`_order`, `_filed`): an expectation is in at most one
    index at a time, and no object per entry is made. `Index.add` and `Index.discard` file
    and take them out (in line there: four times a webhook, a call each was ~2 %)."""

    buckets: dict[Key, Bucket] = field(default_factory=dict)
    selectors: dict[Selector, int] = field(default_factory=dict)  # selector → items under it
    unkeyed: dict[int, Expectation] = field(default_factory=dict)
    size: int = 0

    def _bucket_size(self, key: Key) -> int:
        held = self.buckets.get(key)
        return 0 if held is None else 1 if isinstance(held, Expectation) else len(held)

    def candidates(self, texts: Texts) -> Iterator[Bucket]:
        """The buckets an arrival may match in, unkeyed ones last."""
        yield from self.keyed(texts)
        if self.unkeyed:
            yield self.unkeyed

    def keyed(self, texts: Texts) -> Iterator[Bucket]:
        """The buckets filed under a key the arrival carries."""
        for selector in list(self.selectors):
            found = texts.get(selector)
            if found is None:
                yield from [b for k, b in self.buckets.items() if k[0] == selector]
                continue
            for text in found:
                held = self.buckets.get((selector, text))
                if held is not None:
                    yield held

    def expectations(self) -> Iterator[Expectation]:
        for held in self.buckets.values():
            yield from [held] if isinstance(held, Expectation) else held.values()
        yield from self.unkeyed.values()


class Index:
    """A table's expectations that have a matcher, per channel, found by their matcher's keys.

    Each is filed under one key it requires (or unkeyed), with an order: the first accepting
    expectation in that order wins, as a scan of the table in that order would find."""

    def __init__(self) -> None:
        self._channels: dict[str, ChannelIndex] = {}

    def add(self, expectation: Expectation, order: int) -> None:
        index = self._channels.get(expectation.channel)
        if index is None:
            index = self._channels[expectation.channel] = ChannelIndex()
        keys = expectation._keys
        if keys is None:
            keys = expectation._keys = keys_of(expectation.match)
        # File under the key whose bucket is smallest now: a key every run shares (an event
        # type) fills its bucket at once, so later expectations go under their own value.
        if len(keys) > 1:
            key: Key | None = min(keys, key=index._bucket_size)
        else:
            key = keys[0] if keys else None
        expectation._order, expectation._filed = order, key
        index.size += 1
        if key is None:
            index.unkeyed[order] = expectation
            return
        buckets = index.buckets
        held = buckets.get(key)
        if held is None:
            buckets[key] = expectation
        elif isinstance(held, Expectation):
            buckets[key] = {held._order: held, order: expectation}
        else:
            held[order] = expectation
        selectors = index.selectors
        selectors[key[0]] = selectors.get(key[0], 0) + 1

    def discard(self, expectation: Expectation) -> None:
        order, key = expectation._order, expectation._filed
        if order < 0:  # not indexed: no matcher (yet)
            return
        channel = expectation.channel
        index = self._channels[channel]
        expectation._order, expectation._filed = -1, None
        index.size -= 1
        if key is None:
            del index.unkeyed[order]
        else:
            buckets = index.buckets
            held = buckets[key]
            if isinstance(held, Expectation):
                del buckets[key]
            else:
                del held[order]
                if len(held) == 1:
                    buckets[key] = next(iter(held.values()))
            selectors = index.selectors
            left = selectors[key[0]] - 1
            if left:
                selectors[key[0]] = left
            else:
                del selectors[key[0]]
        if not index.size:  # keep the index as small as the table
            del self._channels[channel]

    def find(self, texts: Texts) -> Expectation | None:
        """The first expectation (lowest order) whose matcher accepts the arrival: the buckets
        of the keys it carries, then the unkeyed ones (`ChannelIndex.candidates`, written out:
        this runs twice per arrival, and the generators cost more than the look-ups)."""
        arrival = texts.arrival
        index = self._channels.get(arrival.channel)
        if index is None:
            return None
        best: Expectation | None = None
        buckets = index.buckets
        for selector in list(index.selectors):
            found = texts.get(selector)
            if found is None:  # reading failed: every bucket under the selector
                for held in [b for k, b in buckets.items() if k[0] == selector]:
                    best = _first_accepting(held, best, arrival)
                continue
            for text in found:  # a loop, not a comprehension: no call (twice an arrival)
                bucket = buckets.get((selector, text))
                if bucket is not None:
                    best = _first_accepting(bucket, best, arrival)
        if index.unkeyed:
            best = _first_accepting(index.unkeyed, best, arrival)
        return best

    def near(self, texts: Texts) -> list[Expectation]:
        """Expectations filed under a key the arrival carries that also carries one of their
        run's own values (`run_keys`), though their matchers refused it (the caller knows none
        accepted): this run's record came, and was wrong."""
        index = self._channels.get(texts.arrival.channel)
        if index is None:
            return []
        return [
            candidate
            for held in index.keyed(texts)
            for candidate in ([held] if isinstance(held, Expectation) else list(held.values()))
            if candidate._keys is not None
            and len(candidate._keys) > 1
            and carries(texts, run_keys_of(candidate.match))
        ]

    def seqs(self) -> set[int]:
        """The seqs of the expectations indexed, for tests of the index's consistency."""
        return {e.seq for index in self._channels.values() for e in index.expectations()}


def _first_accepting(
    held: Bucket, best: Expectation | None, arrival: Arrival
) -> Expectation | None:
    """`best`, or an expectation of `held` before it in order that accepts `arrival`."""
    if not isinstance(held, dict):
        if (best is None or held._order < best._order) and accepts(held, arrival):
            return held
        return best
    for candidate in list(held.values()):
        if (best is None or candidate._order < best._order) and accepts(candidate, arrival):
            best = candidate
    return best


class Expectations(Table[Expectation]):
    """A table of expectations with an index of those that have a matcher, kept in step."""

    def __init__(self) -> None:
        super().__init__()
        self.index = Index()

    def pop(self, seq: int) -> Expectation | None:
        # Table.pop in line (twice a webhook: a call fewer each), then out of the index
        entry = self._all.pop(seq, None)
        if entry is None:
            return None
        channel, item = entry
        bucket = self._by_channel[channel]
        del bucket[seq]
        if not bucket:
            del self._by_channel[channel]
        self.index.discard(item)
        return item
