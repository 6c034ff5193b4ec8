"""Live reload: the flow files read again on SIGHUP, `POST /-/reload` or (with `--watch`) a
change on disk; validated first, so an invalid config leaves the old one running.

Prometheus's own convention tells how it went: `hopwatch_config_last_reload_successful` (1/0)
and `hopwatch_config_last_reload_success_timestamp_seconds`. What changed is applied flow by
flow: unchanged flows keep their schedule, runs in flight and waiting expectations; removed
flows stop (runs aborted, series gone, open incidents closed); changed flows restart with
their new definition; added ones start on their grid.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from monitor.config import Config, Flow, expand_paths, load, unresolved_secrets
from probes.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FlowChanges:
    """What a new config changes, flow by flow (a flow is known by its name)."""

    added: list[Flow]
    removed: list[Flow]
    changed: list[tuple[Flow, Flow]]  # (old, new)

    @property
    def stopping(self) -> list[Flow]:
        return [*self.removed, *(old for old, _ in self.changed)]

    @property
    def starting(self) -> list[Flow]:
        return [*self.added, *(new for _, new in self.changed)]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def summary(self) -> str:
        return f"{len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed"


def diff(old: Config, new: Config) -> FlowChanges:
    before = {f.name: f for f in old.flows}
    after = {f.name: f for f in new.flows}
    return FlowChanges(
        added=[f for name, f in after.items() if name not in before],
        removed=[f for name, f in before.items() if name not in after],
        changed=[(before[n], f) for n, f in after.items() if n in before and before[n] != f],
    )


def needs_restart(old: Config, new: Config) -> list[str]:
    """What a reload cannot apply to a running monitor (its listeners, clients and identity)."""
    problems = []
    if old.settings != new.settings:
        problems.append("settings changed: restart hopwatch to apply them")
    if old.kafka != new.kafka:
        problems.append("kafka.clusters changed: restart hopwatch to apply them")
    return problems


class ReloadMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.successful = Gauge(
            "hopwatch_config_last_reload_successful",
            "1 if the last reload of the flow files succeeded (or none was tried).",
            registry=registry,
        )
        self.success_time = Gauge(
            "hopwatch_config_last_reload_success_timestamp_seconds",
            "Unix time the flow files were last loaded successfully.",
            registry=registry,
        )
        self.reloads = Counter(
            "hopwatch_config_reloads", "Reloads tried, by result.", ["result"], registry=registry
        )
        self.successful.set(1)
        self.success_time.set(time.time())


Apply = Callable[[Config, FlowChanges], Awaitable[None]]


class Reloader:
    """Reads the flow files again and hands what changed to the engine, one reload at a time."""

    def __init__(
        self, paths: Sequence[str | Path], current: Config, apply: Apply, metrics: ReloadMetrics
    ) -> None:
        self.paths = list(paths)
        self.current = current
        self._apply = apply
        self.metrics = metrics
        self._lock = asyncio.Lock()

    async def reload(self) -> tuple[bool, str]:
        """Load, validate, apply; returns (ok, what happened). Never raises for a bad file."""
        async with self._lock:
            try:
                new = await asyncio.to_thread(load, self.paths)
                problems = unresolved_secrets(new) + needs_restart(self.current, new)
            except ConfigError as exc:
                problems = exc.problems
            if problems:
                self.metrics.successful.set(0)
                self.metrics.reloads.labels("failed").inc()
                for problem in problems:
                    log.error("reload refused, the old flows keep running: %s", problem)
                return False, "\n".join(problems)
            changes = diff(self.current, new)
            await self._apply(new, changes)
            self.current = new
            self.metrics.successful.set(1)
            self.metrics.success_time.set(time.time())
            self.metrics.reloads.labels("applied").inc()
            log.info("reloaded the flow files: %s", changes.summary())
            return True, changes.summary()

    async def watch(self, every: float = 1.0) -> None:
        """Reload when a flow file changes (modification time, size, or the set of files in a
        folder); polls, so it works on every file system. Runs until cancelled."""
        seen = _stamp(self.paths)
        while True:
            await asyncio.sleep(every)
            now = _stamp(self.paths)
            if now != seen:
                seen = now
                await self.reload()


def _stamp(paths: Sequence[str | Path]) -> dict[Path, tuple[int, int] | None]:
    stamps: dict[Path, tuple[int, int] | None] = {}
    for path in expand_paths(paths):
        try:
            stat = path.stat()
            stamps[path] = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamps[path] = None
    return stamps
