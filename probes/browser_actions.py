"""The `browser` kind's words: the actions a step takes in its page and what it extracts, as
flow files write them, and the watcher that keeps what the page did (its responses, its
console errors) for waits, extracts and failure reports.

Playwright is never imported here at run time: its objects arrive through the probe.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from probes.checks import validate_json_path
from probes.durations import Duration

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Page, Request, Response

VERBS: Final = ("goto", "click", "fill", "select", "press", "wait_for", "expect")
ERRORS_KEPT: Final = 20  # console errors and failed requests kept per step
ERROR_CHARS: Final = 300
RESPONSES_KEPT: Final = 500  # the page's latest responses, for waits and extracts


def url_matches(url: str, pattern: str) -> bool:
    """A URL pattern: `*` stands for any characters (slashes too); without a `*`, any URL
    containing the text matches."""
    if "*" not in pattern:
        return pattern in url
    parts = pattern.split("*")
    if not url.startswith(parts[0]) or not url.endswith(parts[-1]):
        return False
    at = len(parts[0])
    end = len(url) - len(parts[-1])
    for part in parts[1:-1]:
        found = url.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return at <= end


def _one_of(model: BaseModel, names: tuple[str, ...]) -> str:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        got = f"; got {', '.join(given)}" if given else ""
        raise ValueError(f"give exactly one of {', '.join(names)}{got}")
    return given[0]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WaitFor(_Model):
    """What to wait for: an element, the page's URL, or a response the page receives."""

    selector: str | None = Field(default=None, description="An element; default: none.")
    state: Literal["visible", "attached", "hidden", "detached"] | None = Field(
        default=None, description="The element's state to wait for; default visible."
    )
    url: str | None = Field(default=None, description="The page's URL pattern; default: none.")
    response: str | None = Field(
        default=None, description="URL pattern of a response the page receives; default: none."
    )
    status: int | list[int] | None = Field(
        default=None, description="The response's wanted status; default: any below 400."
    )

    @model_validator(mode="after")
    def _shape(self) -> WaitFor:
        target = _one_of(self, ("selector", "url", "response"))
        if self.state is not None and target != "selector":
            raise ValueError("state goes with selector")
        if self.status is not None and target != "response":
            raise ValueError("status goes with response")
        return self


class PageExpect(_Model):
    """What must hold (waited for up to the action's timeout): about an element, the URL or
    the title."""

    selector: str | None = Field(default=None, description="An element; default: none.")
    text: str | None = Field(
        default=None, description="Text the element contains (a template); default: any."
    )
    visible: bool | None = Field(
        default=None, description="Whether the element is visible; default true."
    )
    count: int | None = Field(
        default=None, ge=0, description="How many elements match; default: any."
    )
    url: str | None = Field(default=None, description="The page's URL pattern; default: none.")
    title: str | None = Field(
        default=None, description="Text the page title contains; default: none."
    )

    @model_validator(mode="after")
    def _shape(self) -> PageExpect:
        target = _one_of(self, ("selector", "url", "title"))
        if target != "selector" and (self.text, self.visible, self.count) != (None,) * 3:
            raise ValueError("text, visible and count go with selector")
        if self.count is not None and (self.text is not None or self.visible is not None):
            raise ValueError("count goes alone: it is about every match, text and visible one")
        return self


class Action(_Model):
    """One thing done in the page: exactly one of goto, click, fill, select, press, wait_for,
    expect, with the fields that go with it."""

    goto: str | None = Field(default=None, description="URL to open (a template).")
    click: str | None = Field(default=None, description="Element to click.")
    fill: str | None = Field(default=None, description="Input to fill with `value`.")
    select: str | None = Field(default=None, description="<select> to set to `value`.")
    press: str | None = Field(default=None, description="Element to press `key` in.")
    wait_for: WaitFor | None = Field(default=None, description="Wait for something.")
    expect: PageExpect | None = Field(default=None, description="Check the page.")
    value: str | list[str] | None = Field(
        default=None, description="fill: the text; select: option value(s) (templates)."
    )
    key: str | None = Field(default=None, description="press: a key, e.g. Enter, Control+A.")
    timeout: Duration | None = Field(
        default=None, description="This action's time limit; default: the step's action_timeout."
    )

    @property
    def verb(self) -> str:
        return next(v for v in VERBS if getattr(self, v) is not None)

    @model_validator(mode="after")
    def _shape(self) -> Action:
        verb = _one_of(self, VERBS)
        if verb in ("fill", "select") and self.value is None:
            raise ValueError(f"{verb} needs a value")
        if verb == "fill" and not isinstance(self.value, str):
            raise ValueError("fill's value is one text")
        if verb not in ("fill", "select") and self.value is not None:
            raise ValueError("value goes with fill or select")
        if (verb == "press") != (self.key is not None):
            raise ValueError("press needs a key, and key goes with press")
        return self

    def describe(self) -> str:
        """The action as messages name it: `click #buy`, `wait_for response /api/orders`."""
        if self.wait_for is not None:
            target = _one_of(self.wait_for, ("selector", "url", "response"))
            return f"wait_for {target} {getattr(self.wait_for, target)}"
        if self.expect is not None:
            target = _one_of(self.expect, ("selector", "url", "title"))
            return f"expect {target} {getattr(self.expect, target)}"
        return f"{self.verb} {getattr(self, self.verb)}"


class BrowserExtract(_Model):
    """A value for later steps: an element's text or attribute, or a JSON path in the body of a
    response the page received."""

    selector: str | None = Field(default=None, description="An element; default: none.")
    attribute: str | None = Field(
        default=None, description="The element's attribute; default: its text."
    )
    response: str | None = Field(
        default=None, description="URL pattern of a response the page received; default: none."
    )
    json_: str | None = Field(
        default=None, alias="json", description="JSON path in the response's body."
    )

    @model_validator(mode="after")
    def _shape(self) -> BrowserExtract:
        target = _one_of(self, ("selector", "response"))
        if target == "selector" and self.json_ is not None:
            raise ValueError("json goes with response")
        if target == "response":
            if self.attribute is not None:
                raise ValueError("attribute goes with selector")
            if self.json_ is None:
                raise ValueError("response needs a json path")
            validate_json_path(self.json_)
        return self


class BrowserGone(Exception):
    """The page closed under the step: its renderer or the whole browser went away."""


class PageWatch:
    """What the page did, as it happens: responses (latest kept) and, bounded, console errors,
    uncaught exceptions and failed requests."""

    def __init__(self, page: Page) -> None:
        self.responses: deque[Response] = deque(maxlen=RESPONSES_KEPT)
        self.errors: deque[str] = deque(maxlen=ERRORS_KEPT)
        self.gone: str | None = None
        self._news = asyncio.Event()
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self._error(f"uncaught {error.name}: {error.message}"))
        page.on("requestfailed", self._request_failed)
        page.on("crash", lambda _: self._close("the page crashed"))
        page.on("close", lambda _: self._close("the page closed"))

    def _response(self, response: Response) -> None:
        self.responses.append(response)
        self._news.set()

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self._error(f"console: {message.text}")

    def _request_failed(self, request: Request) -> None:
        self._error(f"request failed: {request.method} {request.url}: {request.failure}")

    def _error(self, text: str) -> None:
        self.errors.append(text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…")

    def _close(self, why: str) -> None:
        self.gone = self.gone or why
        self._news.set()

    def report(self) -> str | None:
        """The console errors and failed requests, one a line; None when there were none."""
        return "\n".join(self.errors) if self.errors else None

    def latest(self, pattern: str) -> Response | None:
        for response in reversed(self.responses):
            if url_matches(response.url, pattern):
                return response
        return None

    async def response(self, pattern: str, limit_s: float) -> Response:
        """The latest response whose URL matches, waiting up to `limit_s` for one; TimeoutError
        when none came, BrowserGone when the page closed meanwhile."""
        deadline = time.monotonic() + limit_s
        while True:
            found = self.latest(pattern)
            if found is not None:
                return found
            if self.gone is not None:
                raise BrowserGone(self.gone)
            self._news.clear()
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._news.wait()


def describe_response(response: Response) -> str:
    request = response.request
    return f"{request.method} {response.url} answered {response.status}"


def status_ok(want: int | list[int] | None, status: int) -> bool:
    if want is None:
        return status < 400
    return status in want if isinstance(want, list) else status == want
