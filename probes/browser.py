"""The `browser` kind: a flow that starts where users start, in a web page. Playwright drives the
engine's shared Chromium through the step's actions, and what the page saw (the order id its
API returned) goes on to the Kafka and webhook hops of the same run.

Every request the page makes carries the synthetic-traffic marker and the run's traceparent; a
failure keeps a screenshot and the page's console errors with the run. Playwright's errors
become failures in one place, `_translate`; Playwright itself is imported when a step runs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from probes.base import StepConfigBase, StepContext, StepOutcome, Untrusted
from probes.browser_actions import (
    Action,
    BrowserExtract,
    BrowserGone,
    PageExpect,
    PageWatch,
    describe_response,
    status_ok,
    url_matches,
)
from probes.browser_pool import BrowserPool, BrowserUnavailable
from probes.checks import json_path_get
from probes.durations import Duration
from probes.errors import (
    Artifact,
    AssertionFailed,
    ConnectError,
    DnsError,
    ExtractFailed,
    HttpStatusError,
    OtherFailure,
    StepFailed,
    Timeout,
    TlsError,
    drop_frames,
)
from probes.kinds import KindSpec
from probes.untrusted_json import NotJson, loads

if TYPE_CHECKING:
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import Locator, Page

KIND: Final = "browser"
SCREENSHOT_LIMIT: Final = 256 * 1024  # bytes of one failure's screenshot kept in the store
EVIDENCE_TIMEOUT_S: Final = 2.0
# A page handles the response a step failed on a moment later (logs the error, shows it): the
# evidence waits this long for that, when the step's time allows.
SETTLE_S: Final = 0.3
# The probe gives up this much before the runner would, so a step out of time still gets its
# screenshot and console errors.
MARGIN_S: Final = 1.0
# How long a step whose page closed waits to learn whether the whole browser died.
GONE_GRACE_S: Final = 0.5
# Chromium's network errors by their code, as the reasons every kind uses.
_NET_ERRORS: Final = (
    ("ERR_NAME_NOT_RESOLVED", DnsError),
    ("ERR_NAME_RESOLUTION_FAILED", DnsError),
    ("ERR_CERT_", TlsError),
    ("ERR_SSL_", TlsError),
    ("ERR_CONNECTION_", ConnectError),
    ("ERR_ADDRESS_UNREACHABLE", ConnectError),
    ("ERR_EMPTY_RESPONSE", ConnectError),
    ("ERR_TIMED_OUT", Timeout),
)


def _phase(action: Action) -> str:
    """Where an action's time goes: navigation, waiting for the network, or the actions."""
    if action.goto is not None or (action.wait_for is not None and action.wait_for.url):
        return "navigation"
    if action.wait_for is not None and action.wait_for.response is not None:
        return "network"
    return "actions"


def _has_playwright() -> bool:
    try:
        return importlib.util.find_spec("playwright") is not None
    except (ImportError, ValueError):
        return False


class Viewport(BaseModel):
    """The page's size in CSS pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(default=1280, ge=100, le=4096, description="Width; default 1280.")
    height: int = Field(default=720, ge=100, le=4096, description="Height; default 720.")


class Config(StepConfigBase):
    """Actions in a fresh browser context, then values taken from the page."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["browser"] = Field(description="Step kind.")
    actions: list[Action] = Field(
        min_length=1, description="What to do in the page, in order (goto, click, fill, …)."
    )
    extract: dict[str, BrowserExtract] = Field(
        default_factory=dict, description="Values for later steps; default none."
    )
    action_timeout: Duration = Field(
        default=10.0, gt=0, description="How long one action may wait; default 10s."
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra headers on every request the page makes (templates); default none.",
    )
    viewport: Viewport = Field(default_factory=Viewport, description="Page size; default 1280x720.")
    screenshot: bool = Field(
        default=True, description="Keep a screenshot when the step fails; default true."
    )

    @model_validator(mode="after")
    def _playwright_installed(self) -> Config:
        if not _has_playwright():
            raise ValueError("the browser kind needs Playwright: pip install 'hopwatch[browser]'")
        return self


class _Page:
    """One step in its page: the actions, the extracts, the phases they took."""

    def __init__(
        self, config: Config, ctx: StepContext, page: Page, deadline: float, end: float
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.page = page
        self.watch = PageWatch(page)
        self.deadline = deadline  # the actions'; the runner's own is `end`
        self.end = end
        self.phases: dict[str, float] = {}
        self.masked: list[str] = []  # inputs filled with a secret: covered in screenshots

    def limit(self, timeout: float | None) -> tuple[float, bool]:
        """Seconds the next action may wait, and whether the step's end is what bounds it."""
        own = timeout if timeout is not None else self.config.action_timeout
        left = self.deadline - time.monotonic()
        return max(0.0, min(own, left)), left < own

    def _time(self, phase: str, since: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.monotonic() - since

    async def act(self, action: Action) -> None:
        from playwright.async_api import Error

        what = action.describe()
        limit, bounded = self.limit(action.timeout)
        if limit <= 0:
            raise Timeout(f"{what}: the step ran out of time")
        started = time.monotonic()
        try:
            await self._do(action, limit)
        except Error as exc:
            raise await self._translate(exc, action, limit, bounded) from None
        except TimeoutError:
            raise Timeout(f"{what}: not within {limit:.3g}s") from None
        except BrowserGone as gone:
            raise self._gone(what, str(gone)) from None
        finally:
            self._time(_phase(action), started)

    async def _do(self, action: Action, limit: float) -> None:
        page, ms = self.page, limit * 1000
        render = self.ctx.render
        if action.goto is not None:
            url = render(action.goto, "url")
            response = await page.goto(url, timeout=ms)
            if response is not None and response.status >= 400:
                raise HttpStatusError(f"goto {url}: answered {response.status}, want < 400")
        elif action.click is not None:
            await page.locator(render(action.click)).click(timeout=ms)
        elif action.fill is not None:
            selector, value = render(action.fill), render(str(action.value))
            if self.ctx.renderer.redact(value) != value:
                self.masked.append(selector)
            await page.locator(selector).fill(value, timeout=ms)
        elif action.select is not None:
            values = action.value if isinstance(action.value, list) else [str(action.value)]
            await page.locator(render(action.select)).select_option(
                [render(v) for v in values], timeout=ms
            )
        elif action.press is not None:
            await page.locator(render(action.press)).press(str(action.key), timeout=ms)
        elif action.wait_for is not None:
            await self._wait_for(action, limit)
        elif action.expect is not None:
            await self._expect(action.expect, limit, action.describe())

    async def _wait_for(self, action: Action, limit: float) -> None:
        wait = action.wait_for
        assert wait is not None
        if wait.selector is not None:
            locator = self.page.locator(self.ctx.render(wait.selector)).first
            await locator.wait_for(state=wait.state or "visible", timeout=limit * 1000)
        elif wait.url is not None:
            pattern = self.ctx.render(wait.url)
            await self.page.wait_for_url(
                lambda url: url_matches(url, pattern), wait_until="commit", timeout=limit * 1000
            )
        elif wait.response is not None:
            response = await self.watch.response(self.ctx.render(wait.response), limit)
            if not status_ok(wait.status, response.status):
                want = wait.status if wait.status is not None else "< 400"
                raise HttpStatusError(f"{describe_response(response)}, want {want}")

    async def _expect(self, want: PageExpect, limit: float, what: str) -> None:
        from playwright.async_api import TimeoutError as PlaywrightTimeout
        from playwright.async_api import expect

        ms = limit * 1000
        try:
            if want.selector is not None:
                locator = self.page.locator(self.ctx.render(want.selector))
                if want.count is not None:
                    await expect(locator).to_have_count(want.count, timeout=ms)
                    return
                if want.text is not None:
                    await expect(locator.first).to_contain_text(self.ctx.render(want.text),
                                                                timeout=ms)  # fmt: skip
                if want.visible is False:
                    await expect(locator.first).to_be_hidden(timeout=ms)
                elif want.visible or want.text is None:
                    await expect(locator.first).to_be_visible(timeout=ms)
            elif want.url is not None:
                pattern = self.ctx.render(want.url)
                await self.page.wait_for_url(
                    lambda url: url_matches(url, pattern), wait_until="commit", timeout=ms
                )
            elif want.title is not None:
                await self._title_contains(self.ctx.render(want.title), limit)
        except (AssertionError, PlaywrightTimeout):  # the URL wait times out: no assertion
            raise AssertionFailed(f"{what}: {await self._seen(want)}") from None

    async def _title_contains(self, text: str, limit: float) -> None:
        deadline = time.monotonic() + limit
        while text not in await self.page.title():
            if time.monotonic() >= deadline:
                raise AssertionError(text)
            await asyncio.sleep(0.05)  # titles change without an event to wait on

    async def _seen(self, want: PageExpect) -> str:
        """What the page showed instead, in the `…, want …` words of every kind."""
        if want.url is not None:
            return f"the URL is {self.page.url}, want {self.ctx.render(want.url)}"
        if want.title is not None:
            return f"the title is {await self.page.title()!r}, want it to contain {want.title!r}"
        locator = self.page.locator(self.ctx.render(str(want.selector)))
        count = await locator.count()
        if want.count is not None:
            return f"{count} elements match, want {want.count}"
        if count == 0 and want.visible is not False:
            return "no element matches"
        if want.text is not None:
            seen = (await locator.first.inner_text(timeout=1000))[:200]
            return f"the text is {seen!r}, want it to contain {self.ctx.render(want.text)!r}"
        return (
            "it is hidden, want visible"
            if want.visible is not False
            else ("it is visible, want hidden")
        )

    async def extract(self) -> dict[str, Any]:
        from playwright.async_api import Error

        values: dict[str, Any] = {}
        for name, rule in self.config.extract.items():
            limit, _ = self.limit(None)
            started = time.monotonic()
            try:
                values[name] = await self._extract(name, rule, limit)
            except Error as exc:
                if self.watch.gone is not None:
                    raise self._gone(f"extract {name}", self.watch.gone) from None
                drop_frames(exc)
                raise ExtractFailed(f"{name}: {_first_line(exc.message)}") from None
            except BrowserGone as gone:
                raise self._gone(f"extract {name}", str(gone)) from None
            finally:
                self._time("network" if rule.response is not None else "actions", started)
        return values

    async def _extract(self, name: str, rule: BrowserExtract, limit: float) -> Any:
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        if rule.response is not None:
            pattern = self.ctx.render(rule.response)
            try:
                response = await self.watch.response(pattern, limit)
            except TimeoutError:
                raise ExtractFailed(f"{name}: no response from {pattern}") from None
            try:
                doc = loads(await response.body())
            except NotJson as exc:
                raise ExtractFailed(f"{name}: {describe_response(response)}: {exc}") from None
            found = json_path_get(doc, str(rule.json_))
            if not found:
                raise ExtractFailed(f"{name}: {rule.json_} not in {response.url}'s body")
            value = found[0]
        else:
            selector = self.ctx.render(str(rule.selector))
            locator = self.page.locator(selector).first
            try:
                if rule.attribute is None:
                    value = await locator.inner_text(timeout=limit * 1000)
                else:
                    value = await locator.get_attribute(rule.attribute, timeout=limit * 1000)
            except PlaywrightTimeout:
                raise ExtractFailed(f"{name}: no element matches {selector}") from None
            if value is None:
                raise ExtractFailed(f"{name}: {selector} has no attribute {rule.attribute}")
        return Untrusted(value) if isinstance(value, str) else value

    def _gone(self, what: str, why: str) -> StepFailed:
        return OtherFailure(f"{what}: {why}")

    async def _translate(
        self, exc: PlaywrightError, action: Action, limit: float, bounded: bool
    ) -> StepFailed:
        """Playwright's error as the failure of the action it stopped: the only place they
        are read."""
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        drop_frames(exc)
        what, message = action.describe(), _first_line(exc.message)
        if self.watch.gone is not None:
            return self._gone(what, f"{self.watch.gone} ({message})")
        for code, failure in _NET_ERRORS:
            if f"net::{code}" in message:
                return failure(f"{what}: {message}")
        if "strict mode violation" in message:
            return AssertionFailed(f"{what}: the selector matches more than one element")
        if not isinstance(exc, PlaywrightTimeout):
            return OtherFailure(f"{what}: {message}")
        if bounded or action.verb in ("goto", "wait_for"):
            return Timeout(f"{what}: not within {limit:.3g}s")
        target = self.page.locator(self.ctx.render(str(getattr(action, action.verb))))
        try:
            count = await target.count()
        except Exception:  # the page is going: the timeout is what we know
            count = -1
        if count == 0:
            return AssertionFailed(f"{what}: no element matches within {limit:.3g}s")
        if action.verb == "select":
            return AssertionFailed(f"{what}: no option {action.value} within {limit:.3g}s")
        return AssertionFailed(
            f"{what}: the element is not visible and enabled within {limit:.3g}s"
        )

    async def evidence(self, failed: StepFailed, pool: BrowserPool) -> None:
        """The console errors as the failure's excerpt, and a bounded screenshot."""
        if self.watch.gone is None and self.end - time.monotonic() > SETTLE_S + 0.5:
            await asyncio.sleep(SETTLE_S)
        report = self.watch.report()
        if report is not None:
            failed.excerpt = report if failed.excerpt is None else f"{failed.excerpt}\n{report}"
        if not self.config.screenshot or self.watch.gone is not None or not pool.alive():
            return
        from playwright.async_api import Error

        masks: list[Locator] = [self.page.locator(s) for s in self.masked]
        try:
            left = self.end - time.monotonic() - 0.05
            async with asyncio.timeout(max(0.0, min(EVIDENCE_TIMEOUT_S, left))):
                shot, media = await self.page.screenshot(type="png", mask=masks), "image/png"
                if len(shot) > SCREENSHOT_LIMIT:
                    shot = await self.page.screenshot(type="jpeg", quality=50, mask=masks)
                    media = "image/jpeg"
        except (Error, TimeoutError) as exc:
            failed.attributes["browser.screenshot"] = f"not taken: {type(exc).__name__}"
            return
        if len(shot) > SCREENSHOT_LIMIT:
            failed.attributes["browser.screenshot"] = f"{len(shot)} bytes, over the limit"
            return
        failed.artifacts.append(Artifact("screenshot", media, shot))


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


class BrowserProbe:
    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        pool = ctx.lent(KIND, BrowserPool)
        started = time.monotonic()
        budget = ctx.remaining() if config.timeout is None else min(ctx.remaining(), config.timeout)
        deadline = started + budget - min(MARGIN_S, budget * 0.25)
        headers = ctx.outgoing_headers()  # inside the step's span: the page joins its trace
        headers |= {name: ctx.render(value, "header") for name, value in config.headers.items()}
        size = {"width": config.viewport.width, "height": config.viewport.height}
        try:
            async with pool.context(extra_http_headers=headers, viewport=size) as context:
                page = _Page(config, ctx, await context.new_page(), deadline, started + budget)
                page.phases["setup"] = time.monotonic() - started
                try:
                    for action in config.actions:
                        await page.act(action)
                    values = await page.extract()
                except StepFailed as failed:
                    closed = page.watch.gone is not None  # the browser's crash, or the page's own
                    if not pool.alive() or (closed and await pool.gone_within(GONE_GRACE_S)):
                        failed = OtherFailure(
                            f"{failed.message} (the browser went away: it starts again for "
                            "the next step)"
                        )
                    await page.evidence(failed, pool)
                    failed.phases = page.phases
                    failed.latency_s = time.monotonic() - started
                    raise failed from None
                attributes = {"url.full": ctx.renderer.redact(page.page.url)}
        except BrowserUnavailable as exc:
            raise OtherFailure(f"browser: {exc}") from None
        except StepFailed:
            raise
        except Exception as exc:
            if pool.alive():
                raise
            raise OtherFailure(f"the browser went away: {type(exc).__name__}") from None
        return StepOutcome(
            latency_s=time.monotonic() - started,
            vars=values,
            phases=page.phases,
            attributes=attributes,
        )


BROWSER_FAILURES: Final = (
    Timeout, DnsError, ConnectError, TlsError, HttpStatusError, AssertionFailed, ExtractFailed,
    OtherFailure,
)  # fmt: skip

SPEC = KindSpec(Config, BrowserProbe(), failures=BROWSER_FAILURES, shared=BrowserPool)
