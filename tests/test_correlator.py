"""The correlator's rules: matched, early, unmatched, late, duplicate; counted once; bounded."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from monitor.correlator import Arrival, Correlator, CorrelatorOverflow, Expectation
from probes.errors import NotReceived
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
    assert all(len(delivery_id) < 100 for _, delivery_id in correlator._ids)


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
