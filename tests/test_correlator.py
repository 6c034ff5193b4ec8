"""The correlator's rules: matched, early, unmatched, late, duplicate; counted once; bounded."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Collection, Mapping
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from monitor.correlator import Arrival, Correlator, CorrelatorOverflow, Expectation
from probes.checks import json_path_get, path_reader, same_value
from probes.errors import NotReceived
from probes.selectors import found_texts, header_value, wanted_text
from probes.waiting import Rule
from tests.fixtures.webhooks import arrivals_count

CHANNEL = "/hooks/orders"


def arrival(ref: str, delivery_id: str | None = None, channel: str = CHANNEL) -> Arrival:
    doc = {"ref": ref}
    return Arrival(
        source="webhook",
        channel=channel,
        received_at=time.monotonic(),
        received_unix=time.time(),
        headers={},
        body=json.dumps(doc).encode(),
        json=doc,
        delivery_id=delivery_id,
    )


def ref_is(ref: str) -> Any:
    return lambda a: a.json is not None and a.json.get("ref") == ref


def counts(registry: CollectorRegistry) -> dict[str, float]:
    outcomes = ("matched", "unmatched", "duplicate", "late")
    return {o: arrivals_count(registry, o) for o in outcomes if arrivals_count(registry, o)}


def soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


async def waiting(exp: Expectation, ref: str, deadline: float | None = None) -> asyncio.Task[Any]:
    """Start exp.wait in a task and let it reach its await (wait does nothing else before it)."""
    task = asyncio.create_task(exp.wait(ref_is(ref), deadline=deadline))
    await asyncio.sleep(0)
    assert exp.state != "registered"
    return task


async def test_arrival_wakes_its_waiter(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    task = await waiting(exp, "A")
    got = arrival("A", "d1")
    assert correlator.offer(got) == "matched"
    assert await task is got
    assert counts(registry) == {"matched": 1}


async def test_early_arrival_is_claimed_by_its_waiter(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    early = arrival("A", "d1")
    assert correlator.offer(early) == "early"
    assert counts(registry) == {}  # counted once, when claimed
    assert await exp.wait(ref_is("A"), deadline=soon()) is early
    assert counts(registry) == {"matched": 1}
    assert correlator.stats()["early"] == 0


async def test_arrival_nobody_can_claim_is_unmatched_at_once(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    assert correlator.offer(arrival("A")) == "unmatched"
    correlator.expect("/hooks/other", "r1", "hook", soon())  # another channel does not count
    assert correlator.offer(arrival("B")) == "unmatched"
    assert counts(registry) == {"unmatched": 2}
    assert correlator.stats()["early"] == 0


async def test_kept_arrival_unclaimed_is_unmatched_when_its_last_claimant_waits_elsewhere(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    assert correlator.offer(arrival("other")) == "early"
    task = await waiting(exp, "A")
    assert counts(registry) == {"unmatched": 1}
    exp.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_kept_arrival_ages_out_as_unmatched(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    correlator.expect(CHANNEL, "r1", "hook", soon())
    assert correlator.offer(arrival("A")) == "early"
    correlator.purge(time.monotonic() + correlator.early_ttl + 1)
    assert counts(registry) == {"unmatched": 1}
    assert correlator.stats()["early"] == 0


async def test_cancelled_registration_releases_kept_arrivals(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    correlator.offer(arrival("A"))
    exp.cancel()  # the step was skipped after a broken link
    assert counts(registry) == {"unmatched": 1}
    assert correlator.stats()["pending"] == 0


async def test_deadline_then_late_never_credited_to_a_later_run(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    first = correlator.expect(CHANNEL, "r1", "hook", soon())
    with pytest.raises(NotReceived, match=f"nothing matching arrived on {CHANNEL}"):
        await first.wait(ref_is("A"), deadline=soon(0.02))
    second = correlator.expect(CHANNEL, "r2", "hook", soon())
    # The later run's rule would accept the late delivery too: it still goes to run 1, as late.
    task = await waiting(second, "A")
    assert correlator.offer(arrival("A", "d1")) == "late"
    assert not task.done()
    assert correlator.offer(arrival("A", "d2")) == "late"
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counts(registry) == {"late": 2}


async def test_one_timer_expires_each_waiter_at_its_own_deadline(correlator: Correlator) -> None:
    """Waiters share the correlator's one timer: one that waits after another with an earlier
    deadline still expires first, and each expires at its deadline, not at a neighbour's."""
    started = time.monotonic()
    late = await waiting(correlator.expect(CHANNEL, "r1", "hook", soon()), "A", soon(0.3))
    early = await waiting(correlator.expect(CHANNEL, "r2", "hook", soon()), "B", soon(0.05))
    with pytest.raises(NotReceived):
        await early
    assert 0.04 <= time.monotonic() - started < 0.25 and not late.done()
    with pytest.raises(NotReceived):
        await late
    assert time.monotonic() - started >= 0.29


async def test_fulfilled_waiters_do_not_pile_up_under_the_timer(correlator: Correlator) -> None:
    """A fulfilled waiter's deadline stays queued until dropped: never many more than are
    pending, however many runs came and went."""
    for n in range(2_000):
        exp = correlator.expect(CHANNEL, f"r{n}", "hook", soon())
        task = await waiting(exp, f"ref{n}", soon(60))
        correlator.offer(arrival(f"ref{n}"))
        await task
    assert len(correlator._deadlines) <= 2 * correlator.stats()["pending"] + 65


async def test_not_received_says_how_many_others_came(correlator: Correlator) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    task = await waiting(exp, "A", deadline=soon(0.05))
    correlator.offer(arrival("B"))
    with pytest.raises(NotReceived, match=r"1 other arrival\(s\) on it did not match"):
        await task


async def test_outer_cancellation_makes_later_arrivals_late(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):  # the runner's step timeout
            await exp.wait(ref_is("A"), deadline=soon())
    assert exp.state == "expired"
    assert correlator.offer(arrival("A")) == "late"
    assert counts(registry) == {"late": 1}


async def test_duplicate_by_delivery_id(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    task = await waiting(exp, "A")
    assert correlator.offer(arrival("A", "d1")) == "matched"
    await task
    assert correlator.offer(arrival("A", "d1")) == "duplicate"
    assert correlator.offer(arrival("zzz", "d1")) == "duplicate"  # a replayed id, any content
    assert counts(registry) == {"matched": 1, "duplicate": 2}
    assert exp.duplicate_count == 2


async def test_delivery_ids_are_per_channel(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    assert correlator.offer(arrival("A", "d1")) == "unmatched"
    assert correlator.offer(arrival("A", "d1", channel="/hooks/other")) == "unmatched"
    assert correlator.offer(arrival("A", "d1")) == "duplicate"


async def test_duplicate_by_second_match(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    task = await waiting(exp, "A")
    correlator.offer(arrival("A", "d1"))
    await task
    assert correlator.offer(arrival("A", "d2")) == "duplicate"
    assert correlator.offer(arrival("A")) == "duplicate"  # no id at all
    assert counts(registry) == {"matched": 1, "duplicate": 2}


async def test_duplicate_window_reports_a_second_delivery(correlator: Correlator) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    task = await waiting(exp, "A")
    correlator.offer(arrival("A", "d1"))
    await task
    assert await exp.duplicate(0) is None
    watcher = asyncio.create_task(exp.duplicate(5.0))
    await asyncio.sleep(0)
    correlator.offer(arrival("A", "d2"))
    second = await watcher
    assert second is not None and second.delivery_id == "d2"
    assert second.body == b""  # remembered without its content


async def test_duplicate_window_passes_quietly(correlator: Correlator) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    correlator.offer(arrival("A", "d1"))
    await exp.wait(ref_is("A"))
    assert await exp.duplicate(0.02) is None


async def test_two_early_matches_one_claimed_one_duplicate(
    correlator: Correlator, registry: CollectorRegistry
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    first, second = arrival("A", "d1"), arrival("A", "d2")
    correlator.offer(first)
    correlator.offer(second)
    correlator.offer(arrival("A", "d1"))  # an id replay while the original is kept
    assert counts(registry) == {"duplicate": 1}
    assert await exp.wait(ref_is("A")) is first
    assert counts(registry) == {"matched": 1, "duplicate": 2}
    assert exp.duplicate_count == 2
    assert await exp.duplicate(0) is not None


async def test_first_registered_waiter_wins(correlator: Correlator) -> None:
    one = correlator.expect(CHANNEL, "r1", "hook", soon())
    two = correlator.expect(CHANNEL, "r2", "hook", soon())
    t1, t2 = await waiting(one, "A"), await waiting(two, "A")
    correlator.offer(arrival("A", "d1"))
    await t1
    assert not t2.done()
    assert correlator.offer(arrival("A", "d2")) == "duplicate"
    two.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t2


async def test_matcher_that_raises_is_a_non_match(
    correlator: Correlator, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())

    def broken(_: Arrival) -> bool:
        raise KeyError("ref")

    task = asyncio.create_task(exp.wait(broken, deadline=soon(0.05)))
    await asyncio.sleep(0)
    assert correlator.offer(arrival("A")) == "unmatched"
    with pytest.raises(NotReceived):
        await task
    assert "matcher of" in caplog.text


async def test_wait_twice_is_a_bug(correlator: Correlator) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    correlator.offer(arrival("A"))
    await exp.wait(ref_is("A"))
    with pytest.raises(RuntimeError, match="fulfilled"):
        await exp.wait(ref_is("A"))


async def test_kafka_arrivals_counted_under_their_source(registry: CollectorRegistry) -> None:
    counter = Counter("hopwatch_arrivals", "", ["source", "outcome"], registry=registry)
    correlator = Correlator(counter)
    record = arrival("A", channel="main/orders")
    record.source = "kafka"
    correlator.offer(record)
    assert arrivals_count(registry, "unmatched", source="kafka") == 1


# -- bounds ---------------------------------------------------------------------------------


async def test_ten_thousand_random_arrivals_stay_within_limits(
    arrivals: Counter, registry: CollectorRegistry
) -> None:
    correlator = Correlator(arrivals, max_early=500, max_delivery_ids=2_000, early_ttl=60)
    rng = random.Random(7)
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())  # keeps the channel claimable
    for _ in range(10_000):
        ref = f"{rng.getrandbits(64):016x}"
        correlator.offer(arrival(ref, delivery_id=ref))
        stats = correlator.stats()
        assert stats["early"] <= 500
        assert stats["delivery_ids"] <= 2_000
    assert correlator.stats()["overflow_early"] == 9_500
    assert arrivals_count(registry, "unmatched") == 9_500
    exp.cancel()  # the last 500 can no longer be claimed
    assert arrivals_count(registry, "unmatched") == 10_000
    assert correlator.stats()["early"] == 0


async def test_early_table_bounded_in_bytes(arrivals: Counter, registry: CollectorRegistry) -> None:
    correlator = Correlator(arrivals, max_early_bytes=10_000)
    correlator.expect(CHANNEL, "r1", "hook", soon())
    for i in range(50):
        big = arrival(str(i))
        big.body = b"x" * 1_000
        correlator.offer(big)
        assert correlator.stats()["early_bytes"] <= 10_000
    assert correlator.stats()["early"] == 10
    assert arrivals_count(registry, "unmatched") == 40


async def test_an_offer_ages_out_what_finished_before_late_memory(
    arrivals: Counter, registry: CollectorRegistry
) -> None:
    """Arrivals age the finished table as they come (not only the janitor): a repeat of a
    delivery matched longer than `late_memory` ago is no longer known, so unmatched, while one
    within it is still a duplicate."""
    correlator = Correlator(arrivals, late_memory=0.05)
    for ref in ("A", "B"):
        task = await waiting(correlator.expect(CHANNEL, ref, "hook", soon()), ref)
        assert correlator.offer(arrival(ref)) == "matched"
        await task
        if ref == "A":
            await asyncio.sleep(0.06)
    assert correlator.offer(arrival("B")) == "duplicate"  # B finished just now
    assert correlator.offer(arrival("A")) == "unmatched"  # A aged out as B came
    assert correlator.stats()["finished"] == 1


async def test_pending_table_full_refuses_new_expectations(correlator: Correlator) -> None:
    small = Correlator(max_pending=2)
    small.expect(CHANNEL, "r1", "hook", soon())
    stale = small.expect(CHANNEL, "r2", "hook", time.monotonic() - 1)  # a runner leaked it
    small.expect(CHANNEL, "r3", "hook", soon())  # the stale one is dropped to make room
    assert stale.state == "cancelled"
    with pytest.raises(CorrelatorOverflow, match="2 expectations pending, the limit is 2"):
        small.expect(CHANNEL, "r4", "hook", soon())
    assert small.overflow["pending"] == 1


async def test_finished_table_bounded_in_size_and_age() -> None:
    correlator = Correlator(max_late=5, late_memory=60)
    for i in range(10):
        exp = correlator.expect(CHANNEL, f"r{i}", "hook", soon())
        correlator.offer(arrival(str(i)))
        await exp.wait(ref_is(str(i)))
        assert correlator.stats()["finished"] <= 5
    assert correlator.overflow["late"] == 5
    correlator.purge(time.monotonic() + 61)
    assert correlator.stats()["finished"] == 0


async def test_overlong_delivery_ids_are_kept_as_digests(correlator: Correlator) -> None:
    long_id = "x" * 10_000
    assert correlator.offer(arrival("A", long_id)) == "unmatched"
    assert correlator.offer(arrival("A", long_id)) == "duplicate"
    assert all(len(key) < 100 + len(CHANNEL) for key in correlator._ids)


async def test_janitor_counts_unclaimed_arrivals_without_traffic(
    arrivals: Counter, registry: CollectorRegistry
) -> None:
    correlator = Correlator(arrivals, early_ttl=0.01)
    correlator.expect(CHANNEL, "r1", "hook", soon())
    correlator.offer(arrival("A"))
    emptied = asyncio.Event()
    purge = correlator.purge

    def watched_purge(now: float | None = None) -> None:
        purge(now)
        if correlator.stats()["early"] == 0:
            emptied.set()

    correlator.purge = watched_purge  # type: ignore[method-assign]
    janitor = asyncio.create_task(correlator.janitor(every=0.01))
    try:
        async with asyncio.timeout(2):
            await emptied.wait()
    finally:
        janitor.cancel()
    assert arrivals_count(registry, "unmatched") == 1


# -- every arrival counted exactly once, whatever the interleaving ---------------------------

Op = tuple[str, int, int]


async def _play(ops: list[Op]) -> tuple[int, float, dict[str, int]]:
    registry = CollectorRegistry()
    counter = Counter("hopwatch_arrivals", "", ["source", "outcome"], registry=registry)
    correlator = Correlator(counter, max_early=3)
    expectations: list[Expectation] = []
    tasks: list[asyncio.Task[Any]] = []
    offered = 0
    for op, a, b in ops:
        if op == "offer":
            offered += 1
            correlator.offer(arrival(str(a), str(b) if b else None))
        elif op == "expect":
            expectations.append(correlator.expect(CHANNEL, f"r{len(expectations)}", "h", soon()))
        elif expectations:
            exp = expectations[a % len(expectations)]
            if op == "cancel":
                exp.cancel()
            elif exp.state == "registered":
                tasks.append(asyncio.create_task(exp.wait(ref_is(str(b % 4)), deadline=soon(5))))
                await asyncio.sleep(0)
    for exp in expectations:
        exp.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    correlator.purge(time.monotonic() + correlator.early_ttl + 1)
    total = sum(arrivals_count(registry, o) for o in ("matched", "unmatched", "duplicate", "late"))
    return offered, total, correlator.stats()


@settings(max_examples=150, deadline=None)
@example([("expect", 0, 0), ("offer", 1, 0), ("offer", 1, 2), ("offer", 1, 2), ("wait", 0, 1)])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["offer", "offer", "expect", "wait", "cancel"]),
            st.integers(0, 3),
            st.integers(0, 4),
        ),
        max_size=40,
    )
)
def test_every_arrival_is_counted_exactly_once(ops: list[Op]) -> None:
    offered, total, stats = asyncio.run(_play(ops))
    assert total == offered
    assert stats["early"] == 0 and stats["pending"] == 0 and stats["early_bytes"] == 0


# -- the index: indexed matchers behave exactly as a scan of every expectation would ---------


def exact_header(headers: Mapping[str, str], name: str) -> str | None:
    return headers.get(name)  # as Kafka reads its headers


WANTS = [3, 3.0, "3", "3.0", 3.5, "3.5", True, False, "true", 1, "1", 1.0, "1.0", "null", "A"]
FOUND = [3, 3.0, "3", "3.0", 3.5, True, False, "true", 1, "1", None, "A", "a", -0.0, 0, 1e16]
PATHS = ["$.ref", "$.amount", "$.data.id", "$.items[0]"]  # the last one goes via jsonpath-ng
rules = st.builds(
    Rule,
    headers=st.dictionaries(
        st.sampled_from(["X-Run", "x-run", "X-Kind"]), st.sampled_from(["r1", "R1"]), max_size=2
    ),
    paths=st.dictionaries(st.sampled_from(PATHS), st.sampled_from(WANTS), max_size=2),
    key=st.sampled_from([None, b"k1", b"\xff"]),
)
found_values = st.sampled_from(FOUND)
docs = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "ref": found_values,
            "amount": found_values,
            "data": st.one_of(st.fixed_dictionaries({"id": found_values}), found_values),
            "items": st.lists(found_values, max_size=2),
        },
    ),
    st.lists(found_values, max_size=2),
)
RULES = [  # a pool, so that several runs want the same (first wins, duplicate, late)
    Rule({}, {"$.ref": "A"}),
    Rule({}, {"$.ref": "3"}),
    Rule({}, {"$.amount": "3"}),
    Rule({}, {"$.amount": 3.0}),
    Rule({}, {"$.amount": "3.0"}),
    Rule({}, {"$.amount": True}),
    Rule({}, {"$.amount": "true"}),
    Rule({"X-Run": "r1"}, {"$.ref": "A"}),
    Rule({"x-run": "r1", "X-Kind": "R1"}, {}),
    Rule({}, {"$.data.id": 1, "$.ref": "A"}),
    Rule({}, {"$.items[0]": "A"}),
    Rule({}, {}, b"k1"),
    Rule({"X-Kind": "r1"}, {"$.ref": "A"}, b"\xff"),
    Rule({}, {}),  # no keys: checked against every arrival, beside the indexed ones
]
some_rules = st.sampled_from(RULES) | rules
deliveries = st.sampled_from([None, "d1", "d2", "d3"])
random_arrivals = st.tuples(
    docs,
    st.dictionaries(
        st.sampled_from(["X-Run", "x-run", "X-RUN", "X-Kind"]),
        st.sampled_from(["r1", "R1"]),
        max_size=3,
    ),
    st.sampled_from([None, b"k1", b"\xff"]),
    deliveries,
)


ArrivalParts = tuple[Any, dict[str, str], bytes | None, str | None]


def fitting(rule: Rule, rng: random.Random, delivery: str | None) -> ArrivalParts:
    """An arrival made to fit `rule` (values `same_value` accepts, header names in any case),
    sometimes with one thing spoiled."""
    doc: dict[str, Any] = {}
    for path, want in rule.paths.items():
        value = rng.choice([v for v in [*FOUND, want] if same_value(v, want)])
        if path == "$.data.id":
            doc["data"] = {"id": value}
        elif path == "$.items[0]":
            doc["items"] = [value]
        else:
            doc[path.removeprefix("$.")] = value
    headers = {
        rng.choice([name, name.lower(), name.upper()]): value
        for name, value in rule.headers.items()
    }
    spoil = rng.choice(["nothing", "nothing", "nothing", "doc", "header", "key"])
    if spoil == "doc" and doc:
        doc[rng.choice(sorted(doc))] = rng.choice(FOUND)
    if spoil == "header" and headers:
        headers[rng.choice(sorted(headers))] = "R1"
    key = rng.choice([None, b"k1", b"\xff"]) if spoil == "key" else rule.key
    return doc, headers, key, delivery


pool_arrivals = st.builds(
    lambda rule, seed, delivery: fitting(rule, random.Random(seed), delivery),
    st.sampled_from(RULES),
    st.integers(0, 2**32),
    deliveries,
)
channels = st.sampled_from([0, 0, 0, 1])
expect_ops = st.tuples(st.just("expect"), channels, st.none())
wait_ops = st.tuples(st.just("wait"), st.integers(0, 20), some_rules)
reply_ops = st.tuples(
    st.just("reply"), st.integers(0, 20), st.tuples(st.integers(0, 2**32), deliveries)
)
IndexOp = tuple[str, int, Any]
index_ops = st.lists(
    st.one_of(
        expect_ops,
        st.tuples(st.just("expect"), channels, some_rules),
        st.tuples(st.just("expect"), channels, some_rules),
        wait_ops,
        st.tuples(st.just("offer"), channels, pool_arrivals | random_arrivals),
        reply_ops,
        reply_ops,
        st.tuples(st.sampled_from(["cancel", "cancel", "age"]), st.integers(0, 20), st.none()),
    ),
    max_size=60,
)


def keyed_arrival(channel: str, doc: Any, headers: dict[str, str], key: bytes | None) -> Arrival:
    return Arrival(
        source="kafka" if key is not None else "webhook",
        channel=channel,
        received_at=time.monotonic(),
        received_unix=time.time(),
        headers=headers,
        body=json.dumps(doc).encode(),
        json=doc,
        delivery_id=None,
        key=key,
    )


def index_matches_tables(correlator: Correlator) -> None:
    """The index holds exactly the waiting and finished expectations that have a matcher."""
    pending = correlator._pending
    waiting_seqs = {seq for seq, e in pending.items() if e.state == "waiting"}
    assert pending.index.seqs() == waiting_seqs
    finished = correlator._finished
    assert finished.index.seqs() == {seq for seq, e in finished.items() if e.match is not None}
    registered: dict[str, int] = {}
    for _, e in pending.items():
        if e.state == "registered":
            registered[e.channel] = registered.get(e.channel, 0) + 1
    assert correlator._registered == registered


class _Side:
    """One correlator under test, with everything it was asked and answered."""

    def __init__(self, indexed: bool, lookup: Any) -> None:
        self.registry = CollectorRegistry()
        counter = Counter("hopwatch_arrivals", "", ["source", "outcome"], registry=self.registry)
        self.correlator = Correlator(
            counter, max_early=3, max_pending=6, max_late=2, late_memory=10, early_ttl=1_000
        )
        self.indexed, self.lookup = indexed, lookup
        self.expectations: list[Expectation] = []
        self.tasks: list[asyncio.Task[Arrival]] = []
        self.rules: list[tuple[Expectation, Rule]] = []
        self.log: list[Any] = []

    def matcher(self, rule: Rule) -> Any:
        if self.indexed:
            return rule.matcher(self.lookup)
        match = rule.matcher(self.lookup)
        return lambda a: match(a)  # no keys: a scan of every expectation, as before the index

    def wait(self, exp: Expectation, rule: Rule) -> None:
        self.tasks.append(asyncio.create_task(exp.wait(self.matcher(rule), deadline=soon(60))))
        self.rules.append((exp, rule))

    async def play(self, op: str, a: int, arg: Any, offered: list[Arrival]) -> None:
        correlator = self.correlator
        if op == "expect":  # with a rule: and wait at once
            try:
                self.expectations.append(correlator.expect(f"/c{a}", "r", "h", soon(60)))
            except CorrelatorOverflow:
                self.log.append("overflow")
            else:
                if arg is not None:
                    self.wait(self.expectations[-1], arg)
        elif op == "offer":
            self.log.append(correlator.offer(offered[-1]))
        elif op == "age":
            correlator.purge(time.monotonic() + correlator.late_memory + 1)
        elif self.expectations:
            exp = self.expectations[a % len(self.expectations)]
            if op == "cancel":
                exp.cancel()
            elif exp.state == "registered":
                self.wait(exp, arg)
        await asyncio.sleep(0)
        if self.indexed:
            index_matches_tables(correlator)

    async def outcome(self, offered: list[Arrival]) -> list[Any]:
        states = [(e.state, e.duplicate_count) for e in self.expectations]
        for exp in self.expectations:
            exp.cancel()
        got = await asyncio.gather(*self.tasks, return_exceptions=True)
        which = [offered.index(g) if isinstance(g, Arrival) else type(g).__name__ for g in got]
        counted = {o: arrivals_count(self.registry, o, s) for o in OUTCOMES for s in SOURCES}
        return [self.log, states, which, counted, self.correlator.stats()]


SOURCES = ("webhook", "kafka")
OUTCOMES = ("matched", "unmatched", "duplicate", "late")


async def _play_both(ops: list[IndexOp], lookup: Any) -> tuple[list[Any], list[Any]]:
    indexed, scanned = _Side(True, lookup), _Side(False, lookup)
    offered: list[Arrival] = []
    for op, a, arg in ops:
        if op == "reply":  # an arrival made for a run that waits or waited
            if not indexed.rules:
                continue
            exp, rule = indexed.rules[a % len(indexed.rules)]
            seed, delivery = arg
            op, a, arg = "offer", int(exp.channel[2:]), fitting(rule, random.Random(seed), delivery)
        if op == "offer":
            doc, headers, key, delivery = arg
            offered.append(keyed_arrival(f"/c{a}", doc, headers, key))
            offered[-1].delivery_id = delivery
        for side in (indexed, scanned):
            await side.play(op, a, arg, offered)
    return await indexed.outcome(offered), await scanned.outcome(offered)


@settings(max_examples=300, deadline=None)
@given(index_ops, st.sampled_from([header_value, exact_header]))
def test_index_agrees_with_a_scan_of_every_expectation(ops: list[IndexOp], lookup: Any) -> None:
    indexed, scanned = asyncio.run(_play_both(ops, lookup))
    assert indexed == scanned


@given(found_values | st.floats(allow_nan=False), st.sampled_from(WANTS) | st.text(max_size=4))
@example(3.0, "3.0")
@example(1e16, "1e+16")
@example(-0.0, 0)
def test_every_value_same_value_accepts_is_in_the_wanted_bucket(found: Any, want: Any) -> None:
    if same_value(found, want):
        assert wanted_text(want) in found_texts(found)
    for text in found_texts(found):  # and a value's own spellings are wanted texts of it
        assert same_value(found, text)


json_leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_docs = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "a.b", "*"]), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    json_docs,
    st.sampled_from(
        ["$", "$.a", "$.a.b", "a", '$."a.b"', '$["a"].b', "$.*", "$..a", "$.a[0]", "$['a','b']"]
    ),
)
def test_path_reader_reads_as_jsonpath_ng_does(doc: Any, path: str) -> None:
    assert path_reader(path)(doc) == json_path_get(doc, path)


@pytest.mark.parametrize(
    ("want", "found", "matches"),
    [
        ("3", 3, True),
        ("3", 3.0, True),
        ("3.0", 3.0, True),
        ("3.0", 3, False),
        (3, 3.0, True),
        (3.0, "3", False),
        ("true", True, True),
        (True, "true", False),
        (True, 1, False),
        (1, True, False),
        ("null", None, True),
        ("1e+16", 1e16, True),
    ],
)
async def test_indexed_json_match_keeps_same_value_rules(
    correlator: Correlator, want: Any, found: Any, matches: bool
) -> None:
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    rule = Rule({}, {"$.amount": want})
    task = asyncio.create_task(exp.wait(rule.matcher(header_value), deadline=soon()))
    await asyncio.sleep(0)
    got = correlator.offer(keyed_arrival(CHANNEL, {"amount": found}, {}, None))
    assert got == ("matched" if matches else "unmatched")
    exp.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_first_registered_wins_across_buckets(correlator: Correlator) -> None:
    # Both want the same; the first is filed under the shared event type (its bucket was
    # empty), the second under its ref (the type's bucket held one): still, first wins.
    rule = Rule({"X-Event": "paid"}, {"$.ref": "A"})
    one = correlator.expect(CHANNEL, "r1", "hook", soon())
    two = correlator.expect(CHANNEL, "r2", "hook", soon())
    t1 = asyncio.create_task(one.wait(rule.matcher(header_value)))
    t2 = asyncio.create_task(two.wait(rule.matcher(header_value)))
    await asyncio.sleep(0)
    delivered = keyed_arrival(CHANNEL, {"ref": "A"}, {"x-event": "paid"}, None)
    assert correlator.offer(delivered) == "matched"
    assert await t1 is delivered and not t2.done()
    again = keyed_arrival(CHANNEL, {"ref": "A"}, {"x-event": "paid"}, None)
    assert correlator.offer(again) == "duplicate"  # the finished first one still wins
    two.cancel()
    await asyncio.gather(t2, return_exceptions=True)


class _Broken:
    """A selector that cannot read an arrival: its bucket is scanned whole instead."""

    def texts(self, arrival: Arrival) -> Collection[str]:
        raise ValueError("unreadable")


async def test_selector_that_raises_falls_back_to_a_scan(
    correlator: Correlator, caplog: pytest.LogCaptureFixture
) -> None:
    selector = _Broken()

    def match(a: Arrival) -> bool:
        return a.json is not None and a.json.get("ref") == "A"

    match.keys = ((selector, "A"),)  # type: ignore[attr-defined]
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    task = asyncio.create_task(exp.wait(match))
    await asyncio.sleep(0)
    assert correlator.offer(arrival("A")) == "matched"
    assert (await task).json == {"ref": "A"}
    assert "selector" in caplog.text


@pytest.mark.parametrize(
    "keys", [[("not", "a tuple")], (("unhashable", ["list"]),), (("selector", 42),), "text"]
)
async def test_matcher_keys_of_the_wrong_shape_are_scanned(
    correlator: Correlator, keys: Any
) -> None:
    def match(a: Arrival) -> bool:
        return a.json is not None and a.json.get("ref") == "A"

    match.keys = keys  # type: ignore[attr-defined]
    exp = correlator.expect(CHANNEL, "r1", "hook", soon())
    task = asyncio.create_task(exp.wait(match))
    await asyncio.sleep(0)
    assert correlator.offer(arrival("A")) == "matched"
    await task


def ref_rule(ref: str) -> Any:
    return Rule({}, {"$.ref": ref}).matcher(header_value)


async def test_index_follows_every_removal_path(
    arrivals: Counter, registry: CollectorRegistry
) -> None:
    correlator = Correlator(arrivals, max_pending=3, max_late=2, late_memory=10)

    async def waiter(ref: str, deadline: float | None = None) -> tuple[Expectation, Any]:
        exp = correlator.expect(CHANNEL, ref, "hook", soon())
        task = asyncio.create_task(exp.wait(ref_rule(ref), deadline=deadline or soon()))
        await asyncio.sleep(0)
        index_matches_tables(correlator)
        return exp, task

    # finish: matched, then its duplicates and its late arrivals are found in the finished table
    exp, task = await waiter("A")
    assert correlator.offer(arrival("A")) == "matched"
    await task
    index_matches_tables(correlator)
    assert correlator.offer(arrival("A")) == "duplicate"
    # expire: by its deadline; later arrivals are late
    exp, task = await waiter("B", deadline=soon(0.01))
    with pytest.raises(NotReceived):
        await task
    index_matches_tables(correlator)
    assert correlator.offer(arrival("B")) == "late"
    # eviction: a third finished expectation pushes the oldest (A) out of max_late = 2
    exp, task = await waiter("C")
    exp.cancel()  # cancel while waiting: expired, remembered
    await asyncio.gather(task, return_exceptions=True)
    index_matches_tables(correlator)
    assert correlator.overflow["late"] == 1
    assert correlator.offer(arrival("A")) == "unmatched"
    assert correlator.offer(arrival("C")) == "late"
    # purge: finished expectations age out of the index with the table
    correlator.purge(time.monotonic() + 11)
    index_matches_tables(correlator)
    assert correlator.offer(arrival("B")) == "unmatched"
    # cancel before waiting, and the pending table's overflow (a stale one is dropped)
    stale = correlator.expect(CHANNEL, "r-stale", "hook", time.monotonic() - 1)
    kept = correlator.expect(CHANNEL, "r-kept", "hook", soon())
    exp, task = await waiter("D")
    room = correlator.expect(CHANNEL, "r-room", "hook", soon())
    assert stale.state == "cancelled"
    with pytest.raises(CorrelatorOverflow):
        correlator.expect(CHANNEL, "r-over", "hook", soon())
    index_matches_tables(correlator)
    kept.cancel()
    room.cancel()
    index_matches_tables(correlator)
    # a waiter that claims a kept arrival is never indexed as pending, only as finished
    late_claimer = correlator.expect(CHANNEL, "E", "hook", soon())
    assert correlator.offer(arrival("E")) == "early"
    assert (await late_claimer.wait(ref_rule("E"))).json == {"ref": "E"}
    index_matches_tables(correlator)
    assert correlator.offer(arrival("D")) == "matched"
    await task
    index_matches_tables(correlator)
    assert correlator._pending.index.seqs() == set()
