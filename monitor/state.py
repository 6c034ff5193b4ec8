"""The latest result of every (flow, variant), in memory for the API, the page and readiness."""

from __future__ import annotations

from monitor.results import RunResult


class LastRuns(dict[tuple[str, str], RunResult]):
    """A sink: (flow, variant) → its latest finished (not aborted) RunResult."""

    def submit(self, result: RunResult) -> None:
        if result.outcome != "aborted":
            self[(result.flow, result.variant)] = result

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
