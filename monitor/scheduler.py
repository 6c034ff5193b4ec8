"""Runs every (flow, variant) on its interval: never overlapping itself, spread by jitter, capped.

Each (flow, variant) has one loop task, so a hanging target delays only its own flow; the
global semaphore caps runs in flight. Ticks stay on a fixed grid (jitter does not drift), and
ticks missed while a run overran are skipped rather than run back to back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Sequence

from monitor.config import Flow
from monitor.metrics import Metrics
from monitor.runner import Runner

log = logging.getLogger(__name__)

FIRST_STARTS_PER_S = 100.0


class Scheduler:
    def __init__(
        self,
        flows: Sequence[Flow],
        runner: Runner,
        *,
        max_concurrency: int = 256,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.flows = list(flows)
        self.runner = runner
        self.metrics = metrics
        self._sem = asyncio.Semaphore(max_concurrency)
        self._rng = rng or random.Random()
        self._tasks: dict[asyncio.Task[None], bool] = {}  # task → running a run now
        self._stopping = False
        self._pairs = sum(len(f.variants) for f in self.flows)

    def start(self) -> None:
        for flow in self.flows:
            for variant in flow.variants:
                task = asyncio.create_task(self._loop(flow, variant), name=f"{flow.name}/{variant}")
                self._tasks[task] = False

    async def _loop(self, flow: Flow, variant: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        # First runs spread over the jitter, widened so that all flows together start at most
        # FIRST_STARTS_PER_S on average (up to the whole interval, as Prometheus spreads
        # scrapes): a few flows report at once, 10,000 never start in one burst.
        window = max(flow.spread, self._pairs / FIRST_STARTS_PER_S)
        tick = time.monotonic() + self._rng.uniform(0, min(window, flow.interval))
        planned = tick
        while not self._stopping:
            delay = planned - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._stopping:
                return
            async with self._sem:
                if self.metrics is not None:
                    self.metrics.scheduler_lag.observe(max(0.0, time.monotonic() - planned))
                self._tasks[task] = True
                try:
                    await self.runner.run(flow, variant)
                except asyncio.CancelledError:
                    raise
                except Exception:  # the runner already reported; keep the schedule alive
                    log.exception("run of %s/%s raised", flow.name, variant)
                finally:
                    self._tasks[task] = False
            tick += flow.interval
            now = time.monotonic()
            # Skip ticks whose whole jitter window passed while the run overran; a run that
            # is merely late (inside its window) still happens, right away.
            if tick + flow.spread < now:
                tick += math.ceil((now - tick - flow.spread) / flow.interval) * flow.interval
            planned = max(tick + self._rng.uniform(0, flow.spread), now)

    async def stop(self, grace: float = 10.0) -> None:
        """Let in-flight runs finish within `grace`; then cancel them (they end as aborted)."""
        self._stopping = True
        for task, running in list(self._tasks.items()):
            if not running:
                task.cancel()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        self._tasks.clear()
