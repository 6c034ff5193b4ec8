"""A long-running engine settles the garbage collector once started (Options.settle_gc): start-up
objects frozen out of every later collection, young collections only on real growth."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.engine import GC_YOUNG_THRESHOLD, Engine, Options

FLOW = """\
flows:
  - name: f
    steps:
      - {name: ok, kind: http, url: "http://127.0.0.1:9/never-called"}
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
async def test_settle_gc_freezes_start_up_objects_and_raises_young_threshold(
    load_flows: Callable[[str], Config], settle: bool
) -> None:
    before, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    engine = Engine(load_flows(FLOW), Options(settle_gc=settle), CollectorRegistry())
    await engine.start(schedule=False, admin=False)
    try:
        frozen = gc.get_freeze_count()
        threshold = gc.get_threshold()
    finally:
        await engine.stop()
    if settle:
        assert frozen > frozen_before  # config, metric families: everything alive at start
        assert threshold == (GC_YOUNG_THRESHOLD, *before[1:])
        assert before[0] < GC_YOUNG_THRESHOLD
    else:
        assert frozen == frozen_before
        assert threshold == before
