"""The `http_poll` kind: repeat a request until a condition holds, for eventually consistent reads.

The hop latency is how long the data took to appear: from the first request to the one that
satisfied `until`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import Field

from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.checks import check, excerpt, extract, rendered_json, rendered_xpath
from probes.durations import Duration
from probes.errors import StepFailed, Timeout
from probes.http_common import HTTP_FAILURES, HttpExpect, RequestConfig, Response, send
from probes.http_span import http_span
from probes.kinds import KindSpec
from probes.tls_cert import check_valid_for


class Config(StepConfigBase, RequestConfig):
    """Poll a URL until `until` holds or `within` passes."""

    kind: Literal["http_poll"] = Field(description="Step kind.")
    until: HttpExpect = Field(description="The condition that ends polling (same shape as expect).")
    every: Duration = Field(default=0.5, description="Pause between requests; default 500ms.")
    within: Duration = Field(default=10.0, description="Give up after this long; default 10s.")


class _Unanswered(Exception):
    """A request still in flight at the step's deadline."""


async def _send_by(deadline: float, config: Config, ctx: StepContext) -> Response:
    """`send`, cut at `deadline`: `within` bounds the hop, the request in flight included, so a
    target that hangs fails the hop at its deadline and not at the run's timeout."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await send(config, ctx)
    except TimeoutError:
        raise _Unanswered from None


class HttpPollProbe:
    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        started = time.monotonic()
        deadline = started + config.within
        attempts = 0
        last: StepFailed | None = None
        last_resp: Response | None = None
        rendered = rendered_json(config.until, ctx)
        rendered_paths = rendered_xpath(config.until, ctx)
        while True:
            attempts += 1
            try:
                resp = await _send_by(deadline, config, ctx)
                last_resp = resp
                check(
                    config.until,
                    status=resp.status,
                    headers=resp.headers,
                    body=resp.body,
                    latency_s=None,
                    rendered_json=rendered,
                    rendered_xpath=rendered_paths,
                )
                check_valid_for(resp.tls_not_after, config.until.tls_valid_for)
                values = extract(config.extract, headers=resp.headers, body=resp.body)
                return StepOutcome(
                    latency_s=time.monotonic() - started,
                    vars=values,
                    phases=resp.phases,
                    attributes={"http.response.status_code": resp.status, "attempts": attempts},
                    tls_not_after=resp.tls_not_after,
                )
            except _Unanswered:
                if last is None:  # nothing answered at all; else the last answer says most
                    last = Timeout(
                        f"request {attempts} unanswered at the {config.within:g}s deadline"
                    )
                break
            except StepFailed as failed:
                last = failed
            pause = min(config.every, deadline - time.monotonic())
            if pause <= 0:
                break
            await asyncio.sleep(pause)
        # The last failure says most about why: 404 vs a status still "pending" vs refused.
        failure = (type(last) if last is not None else Timeout)(
            f"{last} (still, after {attempts} attempts in {config.within:g}s)",
            excerpt=excerpt(last_resp.body) if last_resp else None,
            latency_s=time.monotonic() - started,
            attributes={"attempts": attempts},
        )
        failure.tls_not_after = last_resp.tls_not_after if last_resp else None
        raise failure


SPEC = KindSpec(
    Config,
    HttpPollProbe(),
    failures=HTTP_FAILURES,
    span=http_span,
    tls=lambda config: config.tls,
)
