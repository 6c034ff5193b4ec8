"""Every step kind, listed once: the registry (`KINDS`) and the config union derived from it.

Adding a kind: a module with `Config`, a probe and `SPEC = KindSpec(...)`, and one line here.
Installed packages add kinds through the `hopwatch.kinds` entry point group instead.
"""

from __future__ import annotations

from probes import (
    browser,
    dns,
    grpc,
    http,
    http_poll,
    kafka_consume,
    kafka_produce,
    sql,
    tcp,
    webhook_await,
)
from probes.kinds import Kinds, KindSpec

__all__ = ["KINDS", "KindSpec", "StepConfig"]

KINDS = Kinds(
    (
        http.SPEC,
        http_poll.SPEC,
        webhook_await.SPEC,
        kafka_produce.SPEC,
        kafka_consume.SPEC,
        sql.SPEC,
        tcp.SPEC,
        dns.SPEC,
        grpc.SPEC,
        browser.SPEC,
    )
)
KINDS.load_entry_points()

# The built-in kinds and the installed ones; monitor.config rebuilds its models from
# `KINDS.union()` when a kind is registered later.
StepConfig = KINDS.union()
