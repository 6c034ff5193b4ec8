"""The `http` kind: one request, checked against expectations, values extracted for later steps."""

from __future__ import annotations

import contextlib
from typing import Literal

from pydantic import Field

from probes.base import StepConfigBase, StepContext, StepOutcome
from probes.checks import check, excerpt, extract, rendered_json, rendered_xpath
from probes.errors import StepFailed
from probes.http_common import HTTP_FAILURES, HttpExpect, RequestConfig, send
from probes.http_span import http_span
from probes.kinds import KindSpec
from probes.tls_cert import check_valid_for


class Config(StepConfigBase, RequestConfig):
    """An HTTP request step."""

    kind: Literal["http"] = Field(description="Step kind.")
    expect: HttpExpect = Field(
        default_factory=HttpExpect, description="Assertions; default: any 2xx."
    )


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
                rendered_xpath=rendered_xpath(config.expect, ctx) if config.expect.xpath else None,
            )
            check_valid_for(resp.tls_not_after, config.expect.tls_valid_for)
            values = extract(config.extract, headers=resp.headers, body=resp.body)
        except StepFailed as failed:
            # Keep what can be taken, so cleanup can still undo what this request created.
            with contextlib.suppress(StepFailed):
                failed.vars = extract(config.extract, headers=resp.headers, body=resp.body)
            failed.excerpt = excerpt(resp.body)
            failed.phases = resp.phases
            failed.latency_s = resp.latency_s
            failed.attributes.update(attributes)
            failed.tls_not_after = resp.tls_not_after
            raise
        return StepOutcome(
            latency_s=resp.latency_s,
            vars=values,
            phases=resp.phases,
            attributes=attributes,
            tls_not_after=resp.tls_not_after,
        )


SPEC = KindSpec(
    Config,
    HttpProbe(),
    failures=HTTP_FAILURES,
    span=http_span,
    tls=lambda config: config.tls,
    one_request=True,
)
