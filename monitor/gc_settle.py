"""Keeps the garbage collector's pauses out of the measurements of a long-running monitor.

A monitor's heap is mostly long-lived: the config, metric families and modules from start-up,
then each flow's own state once it has run (its latest result, pooled connections, label
children). Every collection that walks those objects again is a pause in which no response is
stamped. So the engine settles the collector twice: at start (`settle_start`) and once every
scheduled flow has finished a run (`settle_after_first_round`), each time collecting and then
freezing what is alive out of all later collections; young collections then wait for real
growth (GC_YOUNG_THRESHOLD net allocations), not for the few thousand objects that runs in flight
hold at any time.

Frozen objects are still freed when their last reference goes; only reference cycles among
them would stay. Runs make none under uvloop, failed ones included (their library errors'
frames are cleared: probes.errors.drop_frames), so what the second settle catches in
flight is freed when those runs end (tests/test_engine_gc.py counts cycles per run).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

log = logging.getLogger(__name__)

# Runs in flight keep ~50-70 objects each alive, so the default 700 net allocations are crossed
# many times a second, and every young collection walks every live run: ~15 pauses/s of 3-4 ms
# at 1,000 checks/s. Frees of older objects count against the threshold too, so the young list
# outgrows it: at 5,000 the pauses still came every few hundred ms, 5-21 ms long at 1,000
# checks/s (the p99 error's tail) and with 200 runs awaiting webhooks (7 % of the CPU). At
# 50,000 steady load does not reach it; growth or cyclic garbage (a few MB at most) still does.
GC_YOUNG_THRESHOLD = 50_000


def settle() -> int:
    """Collect, then freeze every object alive out of later collections; how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def settle_start() -> None:
    """At start, before the first runs are planned (the collection itself takes a while: 100 ms
    at 10,000 flows): start-up objects frozen, young collections only on real growth."""
    settle()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def settle_after_first_round(
    every_flow_ran: asyncio.Event, cap_s: float, settled: asyncio.Event
) -> None:
    """Once every flow has finished a run (or after `cap_s`, should the scheduler fall behind),
    settle again: the flows' own state, made by their first runs, joins the start-up objects.
    One pause, at a known time, instead of young and older collections walking that state
    again and again."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(every_flow_ran.wait(), cap_s)
    started = time.perf_counter()
    frozen = settle()
    log.info(
        "garbage collector settled after the first round: %d objects frozen in %.0f ms",
        frozen,
        (time.perf_counter() - started) * 1000,
    )
    settled.set()
