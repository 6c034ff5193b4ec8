"""Every step kind, listed once: the discriminated config union and the probe registry."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from probes import http, http_poll

StepConfig = Annotated[
    http.Config | http_poll.Config,
    Field(discriminator="kind"),
]

PROBES: dict[str, Any] = {
    "http": http.HttpProbe(),
    "http_poll": http_poll.HttpPollProbe(),
}
