"""A long-running engine settles the garbage collector (Options.settle_gc): start-up objects
frozen out of every later collection at start, each flow's own state once every flow has run,
and young collections only on real growth."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.engine import Engine, Options
from monitor.gc_settle import GC_YOUNG_THRESHOLD
from tests.fixtures.core import free_port, serve
from tests.test_http import target_app

FLOWS = """\
flows:
  - name: first
    interval: {interval}
    jitter: 0.05
    steps:
      - {{name: get, kind: http, url: "http://127.0.0.1:{port}/json"}}
  - name: second
    interval: {interval}
    jitter: 0.05
    variants: {{a: {{}}, b: {{}}}}
    steps:
      - {{name: get, kind: http, url: "http://127.0.0.1:{port}/json"}}
"""


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """The test process's collector as it was, whatever the engine did to it."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
@pytest.mark.parametrize("settle", [True, False])
async def test_start_freezes_start_up_objects_and_raises_young_threshold(
    load_flows: Callable[[str], Config], settle: bool
) -> None:
    before, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    config = load_flows(FLOWS.format(interval="1h", port=9))
    engine = Engine(config, Options(settle_gc=settle), CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    try:
        frozen, threshold = gc.get_freeze_count(), gc.get_threshold()
    finally:
        await engine.stop()
    if settle:
        assert frozen > frozen_before  # config, metric families: everything alive at start
        assert threshold == (GC_YOUNG_THRESHOLD, *before[1:])
        assert before[0] < GC_YOUNG_THRESHOLD
    else:
        assert (frozen, threshold) == (frozen_before, before)


@pytest.mark.usefixtures("restored_gc")
async def test_settles_again_once_every_flow_and_variant_has_run(
    load_flows: Callable[[str], Config],
) -> None:
    target = await serve(target_app())
    config = load_flows(FLOWS.format(interval="0.3s", port=target.port))
    engine = Engine(config, Options(settle_gc=True), CollectorRegistry())
    try:
        await engine.start(admin=False)
        after_start = gc.get_freeze_count()
        assert not engine.gc_settled.is_set()
        await asyncio.wait_for(engine.gc_settled.wait(), timeout=10)
        assert set(engine.last_runs) == {("first", "default"), ("second", "a"), ("second", "b")}
        assert gc.get_freeze_count() > after_start  # the flows' own state joined them
    finally:
        await engine.stop()
        await target.close()


CYCLE_FLOWS = """\
flows:
  - name: refused
    steps:
      - {{name: get, kind: http, url: "http://127.0.0.1:{closed}/x"}}
  - name: refused_reused
    reuse_connections: true
    steps:
      - {{name: get, kind: http, url: "http://127.0.0.1:{closed}/x"}}
  - name: too_slow
    timeout: 0.05s
    steps:
      - {{name: get, kind: http, url: "http://127.0.0.1:{port}/slow?ms=1000"}}
  - name: ok
    steps:
      - {{name: get, kind: http, url: "http://127.0.0.1:{port}/json"}}
"""


@pytest.mark.usefixtures("restored_gc")
async def test_runs_leave_no_reference_cycles_even_when_they_fail(
    load_flows: Callable[[str], Config],
) -> None:
    """What settling freezes must not hold cycles, and a dead target (every run failing) must
    not feed the collector: aiohttp's and uvloop's errors come with ~100 objects in cycles."""
    target = await serve(target_app())
    config = load_flows(CYCLE_FLOWS.format(closed=free_port(), port=target.port))
    engine = Engine(config, Options(), CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    try:
        for flow in config.flows:
            for _ in range(3):  # pools, caches and lazily built parts made first
                await engine.runner.run(flow, "default")
            gc.collect()
            gc.disable()
            try:
                outcomes = {(await engine.runner.run(flow, "default")).outcome for _ in range(10)}
                gc.set_debug(gc.DEBUG_SAVEALL)
                in_cycles = gc.collect()
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            assert outcomes == {"success" if flow.name == "ok" else "failure"}
            # asyncio's own selector transport is a cycle of ~7 objects per closed connection
            # (uvloop's is none); a failed request's frames were ~100 objects a run
            assert in_cycles < 200, f"{flow.name}: {in_cycles} objects in cycles after 10 runs"
    finally:
        await engine.stop()
        await target.close()
