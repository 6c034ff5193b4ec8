"""The `http` kind: one request, checked against expectations, values extracted for later steps."""

from __future__ import annotations

import contextlib
from typing import Literal

from pydantic import Field

from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.checks import Expect, check, excerpt, extract, rendered_json
from probes.errors import StepFailed
from probes.http_common import HTTP_FAILURES, RequestConfig, send
from probes.http_span import http_span
from probes.kinds import KindSpec


class Config(StepConfigBase, RequestConfig):
    """An HTTP request step."""

    kind: Literal["http"] = Field(description="Step kind.")
    expect: Expect = Field(default_factory=Expect, description="Assertions; default: any 2xx.")


class HttpProbe:
    async def run(self, config: Config, ctx: StepContext) -> StepOutcome:
        resp = await send(config, ctx)
        attributes = {"http.response.status_code": resp.status}
        try:
            rendered = rendered_json(config.expect, ctx) if config.expect.json_ else None
            check(
                config.expect,
                status=resp.status,
                headers=resp.headers,
                body=resp.body,
                latency_s=resp.latency_s,
                rendered_json=rendered,
            )
            values = extract(config.extract, headers=resp.headers, body=resp.body)
        except StepFailed as failed:
            # Keep what can be taken, so cleanup can still undo what this request created.
            with contextlib.suppress(StepFailed):
                failed.vars = extract(config.extract, headers=resp.headers, body=resp.body)
            failed.excerpt = excerpt(resp.body)
            failed.phases = resp.phases
            failed.latency_s = resp.latency_s
            failed.attributes.update(attributes)
            raise
        return StepOutcome(
            latency_s=resp.latency_s, vars=values, phases=resp.phases, attributes=attributes
        )


SPEC = KindSpec(
    Config,
    HttpProbe(),
    failures=HTTP_FAILURES,
    span=http_span,
    tls=lambda config: config.tls,
)
