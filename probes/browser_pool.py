"""The `browser` kind's one Chromium, shared by every run so a browser step costs a context,
not a process: launched on first use, restarted after a crash, at most `concurrency` steps at
once, its memory read from /proc for /metrics.

The engine makes one `BrowserPool` at start (`KindSpec.shared`) and closes it at stop.
Playwright is imported here, when the pool first launches, so a monitor without the `browser`
extra still starts and validates flows that do not use the kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from probes.base import Reading

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Playwright

log = logging.getLogger(__name__)

CHROMIUM_ENV: Final = "HOPWATCH_CHROMIUM"
CONCURRENCY_ENV: Final = "HOPWATCH_BROWSER_CONCURRENCY"
DEFAULT_CHROMIUM: Final = "/usr/bin/chromium"  # Debian's `chromium`: no browser download
DEFAULT_CONCURRENCY: Final = 2
# Headless, and quiet: no first-run pages, no updates or sync calling home from a monitor.
CHROMIUM_ARGS: Final = (
    "--headless",
    "--no-sandbox",  # monitors run as a service user in a container; the pages are our own
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
LAUNCH_TIMEOUT_S: Final = 30.0
CLOSE_TIMEOUT_S: Final = 10.0
# Reading the processes' PSS costs ~70 ms (the kernel walks their page tables): done in a
# thread, at most this often, and /metrics shows the latest figure.
MEASURE_EVERY_S: Final = 5.0


class BrowserUnavailable(Exception):
    """Chromium could not be started (missing, or Playwright is not installed)."""


def settings_from_env() -> tuple[str, int]:
    """The Chromium path and the step limit, from the environment or the defaults."""
    executable = os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM
    raw = os.environ.get(CONCURRENCY_ENV, "")
    try:
        concurrency = int(raw) if raw else DEFAULT_CONCURRENCY
    except ValueError:
        raise ValueError(f"{CONCURRENCY_ENV}={raw!r}: want a whole number") from None
    if concurrency < 1:
        raise ValueError(f"{CONCURRENCY_ENV}={raw!r}: want 1 or more")
    return executable, concurrency


# What `BrowserPool.readings()` shows on /metrics, by type (the dashboards' tests check names).
BROWSER_METRIC_NAMES: Final = {
    "hopwatch_browser_memory_bytes": "gauge",
    "hopwatch_browser_steps_running": "gauge",
    "hopwatch_browser_steps_waiting": "gauge",
    "hopwatch_browser_restarts_total": "counter",
}


class BrowserPool:
    """One Chromium for the engine; a fresh context per step, `concurrency` steps at once."""

    def __init__(self, executable: str | None = None, concurrency: int | None = None) -> None:
        env_executable, env_concurrency = settings_from_env()
        self.executable = executable or env_executable
        self.concurrency = concurrency or env_concurrency
        self._slots = asyncio.Semaphore(self.concurrency)
        self._lock = asyncio.Lock()
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self.pid: int | None = None  # the browser process, for /metrics and the crash tests
        self.launches = 0
        self.restarts = 0  # launches after the browser went away without us closing it
        self.running = 0
        self.waiting = 0
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        self._memory = 0
        self._measured_at = -MEASURE_EVERY_S
        self._measuring: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def context(self, **options: Any) -> AsyncIterator[BrowserContext]:
        """A fresh context of the shared browser for one step, within the step limit; the
        browser is (re)started when it is not running. The context is closed after the step
        returns (a page with requests in flight can take a while), and holds its slot until
        it is."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        context: BrowserContext | None = None
        try:
            browser = await self._running_browser()
            context = await browser.new_context(**options)
            yield context
        finally:
            if context is None:
                self._release()
            else:
                closing = asyncio.create_task(self._close(context))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def _close(self, context: BrowserContext) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await context.close()
        except Exception:  # a crashed browser took it already; a stuck one is restarted
            log.debug("closing a browser context failed", exc_info=True)
        finally:
            self._release()
            self._measure_soon()

    def _release(self) -> None:
        self.running -= 1
        self._slots.release()

    def alive(self) -> bool:
        """Whether the browser is still connected (False after a crash)."""
        return self._browser is not None and self._browser.is_connected()

    async def gone_within(self, seconds: float) -> bool:
        """Whether the browser's connection is found gone within `seconds`: a killed browser
        closes its pages a moment before Playwright sees its connection drop, so a step whose
        page closed asks this before it says why."""
        browser = self._browser
        if browser is None or not browser.is_connected():
            return True
        gone = asyncio.Event()
        browser.once("disconnected", lambda _: gone.set())
        try:
            async with asyncio.timeout(seconds):
                await gone.wait()
        except TimeoutError:
            return False
        return True

    async def _running_browser(self) -> Browser:
        async with self._lock:
            if self._closed:
                raise BrowserUnavailable("the monitor is stopping")
            browser = self._browser
            if browser is not None and browser.is_connected():
                return browser
            if browser is not None:
                self.restarts += 1
                log.warning("Chromium (pid %s) went away: starting a new one", self.pid)
                with contextlib.suppress(Exception):
                    await browser.close()
            self._browser = None
            self.pid = None
            self._browser = await self._launch()
            return self._browser

    async def _launch(self) -> Browser:
        if not _executable(self.executable):
            raise BrowserUnavailable(f"no Chromium at {self.executable} (set {CHROMIUM_ENV})")
        try:
            from playwright.async_api import Error, async_playwright
        except ImportError:
            raise BrowserUnavailable(
                "Playwright is not installed: pip install 'hopwatch[browser]'"
            ) from None
        if self._playwright is None:
            self._playwright = await async_playwright().start()
        try:
            browser = await self._playwright.chromium.launch(
                executable_path=self.executable,
                args=list(CHROMIUM_ARGS),
                timeout=LAUNCH_TIMEOUT_S * 1000,
            )
        except Error as exc:
            # The driver itself may be what died: start it again for the next attempt.
            playwright, self._playwright = self._playwright, None
            with contextlib.suppress(Exception):
                await playwright.stop()
            raise BrowserUnavailable(f"Chromium did not start: {exc.message}") from None
        self.launches += 1
        self.pid = await _browser_pid(browser)
        self._measured_at = -MEASURE_EVERY_S
        self._measure_soon()
        log.info("Chromium %s started (pid %s)", browser.version, self.pid)
        return browser

    def memory_bytes(self) -> int:
        """The browser's processes' proportional set size (shared pages counted once), as last
        measured; 0 when it is not running."""
        return self._memory if self.alive() else 0

    def _measure_soon(self) -> None:
        pid = self.pid
        running = self._measuring is not None and not self._measuring.done()
        if pid is None or running or time.monotonic() - self._measured_at < MEASURE_EVERY_S:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a scrape from another thread: the next step measures
            return
        self._measured_at = time.monotonic()
        self._measuring = loop.create_task(self._measure(pid))

    async def _measure(self, pid: int) -> None:
        self._memory = await asyncio.to_thread(tree_pss_bytes, pid)

    def readings(self) -> Iterable[Reading]:
        """What /metrics shows of the shared browser."""
        self._measure_soon()
        yield Reading(
            "hopwatch_browser_memory_bytes",
            "Memory of the shared Chromium's processes (PSS, bytes).",
            float(self.memory_bytes()),
        )
        yield Reading(
            "hopwatch_browser_steps_running", "Browser steps holding a slot.", self.running
        )
        yield Reading(
            "hopwatch_browser_steps_waiting", "Browser steps waiting for a slot.", self.waiting
        )
        yield Reading(
            "hopwatch_browser_restarts_total",
            "Times the shared Chromium was started again after it went away.",
            self.restarts,
            "counter",
        )

    async def settled(self) -> None:
        """Wait until the contexts of finished steps are closed (their slots free)."""
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def aclose(self) -> None:
        await self.settled()
        if self._measuring is not None:
            await asyncio.gather(self._measuring, return_exceptions=True)
        async with self._lock:
            self._closed = True
            browser, self._browser = self._browser, None
            playwright, self._playwright = self._playwright, None
            self.pid = None
            if browser is not None:
                with contextlib.suppress(Exception):
                    await browser.close()
            if playwright is not None:
                with contextlib.suppress(Exception):
                    await playwright.stop()


async def _browser_pid(browser: Browser) -> int | None:
    """The browser process's id, as Chromium itself reports it (Playwright does not say)."""
    try:
        session = await browser.new_browser_cdp_session()
        try:
            info = await session.send("SystemInfo.getProcessInfo")
        finally:
            await session.detach()
    except Exception:
        log.warning("Chromium's process id is unknown: its memory is not measured")
        return None
    for process in info.get("processInfo", []):
        if process.get("type") == "browser":
            return int(process["id"])
    return None


def _executable(path: str) -> bool:
    return os.access(path, os.X_OK)


def tree_pss_bytes(root: int) -> int:
    """PSS of `root` and every process below it, in bytes."""
    return sum(_pss_bytes(pid) for pid in _descendants(root))


def _descendants(root: int) -> list[int]:
    """`root` and every process below it (renderers, GPU, network service), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and brackets: the fields follow its last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
