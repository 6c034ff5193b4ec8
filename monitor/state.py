"""The latest result of every (flow, variant), in memory for the API, the page and readiness."""

from __future__ import annotations

import asyncio

from monitor.results import RunResult


class LastRuns(dict[tuple[str, str], RunResult]):
    """A sink: (flow, variant) → its latest finished (not aborted) RunResult. `complete` is set
    once it holds `expected` of them: every flow has run (the engine settles its GC then)."""

    def __init__(self, expected: int = 0) -> None:
        super().__init__()
        self.expected = expected
        self.complete = asyncio.Event()

    def submit(self, result: RunResult) -> None:
        if result.outcome != "aborted":
            self[(result.flow, result.variant)] = result
            if len(self) >= self.expected:
                self.complete.set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
