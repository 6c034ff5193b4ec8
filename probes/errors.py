"""The two error families: the system under watch misbehaved (StepFailed), or we did (the rest).

StepFailed
├── Timeout            reason "timeout"
├── DnsError           reason "dns_error"
├── ConnectError       reason "connect_error"
├── TlsError           reason "tls_error"
├── HttpStatusError    reason "http_status"
├── AssertionFailed    reason "assertion"
├── ExtractFailed      reason "extract"
├── SignatureInvalid   reason "signature"
├── NotReceived        reason "not_received"
├── Duplicate          reason "duplicate"
├── OutOfOrder         reason "out_of_order"
└── OtherFailure       reason "error"

ConfigError            a flow file is wrong; never counted against a target

drop_frames(exc) is for the places where a library's error becomes a StepFailed; os_reason(exc)
words a socket error as the system does.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any, ClassVar, Final


@dataclass(frozen=True, slots=True)
class Artifact:
    """Evidence a failed step keeps with its run (a screenshot): bounded by the kind, and
    written only to the store, never to spans, events or metrics."""

    name: str
    media_type: str
    data: bytes


class StepFailed(Exception):
    """The system under watch did not do what the step expects; carries a reason."""

    reason: ClassVar[str] = "error"

    def __init__(
        self,
        message: str,
        *,
        excerpt: str | None = None,
        phases: dict[str, float] | None = None,
        attributes: dict[str, Any] | None = None,
        latency_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.excerpt = excerpt
        self.phases = phases or {}
        self.attributes = attributes or {}
        self.latency_s = latency_s
        self.vars: dict[str, Any] = {}  # values taken despite the failure, for cleanup steps
        self.tls_not_after: float | None = None  # known even when the step failed on it
        self.artifacts: list[Artifact] = []  # kept with the run in the store


class Timeout(StepFailed):
    reason = "timeout"


class DnsError(StepFailed):
    reason = "dns_error"


class ConnectError(StepFailed):
    reason = "connect_error"


class TlsError(StepFailed):
    reason = "tls_error"


class HttpStatusError(StepFailed):
    reason = "http_status"


class AssertionFailed(StepFailed):
    reason = "assertion"


class ExtractFailed(StepFailed):
    reason = "extract"


class SignatureInvalid(StepFailed):
    reason = "signature"


class NotReceived(StepFailed):
    reason = "not_received"


class Duplicate(StepFailed):
    reason = "duplicate"


class OutOfOrder(StepFailed):
    reason = "out_of_order"


class OtherFailure(StepFailed):
    reason = "error"


# Every failure class, in the order of the tree above; a kind's reasons are read from these.
FAILURES: Final[tuple[type[StepFailed], ...]] = (
    Timeout,
    DnsError,
    ConnectError,
    TlsError,
    HttpStatusError,
    AssertionFailed,
    ExtractFailed,
    SignatureInvalid,
    NotReceived,
    Duplicate,
    OutOfOrder,
    OtherFailure,
)
REASONS: Final = tuple(f.reason for f in FAILURES)


class ConfigError(Exception):
    """A flow file is wrong; `problems` holds one `file:line: where: message` string each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class TemplateError(Exception):
    """A template could not be rendered (unknown name, bad syntax): a flow bug, not the target's."""


def drop_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames in `exc`'s tracebacks (and its causes'), for a
    library's error that becomes a StepFailed. Those frames (aiohttp's, uvloop's,
    aiohappyeyeballs') hold futures and lists that hold the error: reference cycles that only
    the garbage collector frees, ~100 objects per failed request, and a dead target fails every
    run. What is reported keeps the exceptions and their lines."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        todo += (current.__cause__, current.__context__)


def os_reason(exc: OSError) -> str:
    """Why a socket call failed, in the system's words ("Connection refused"): asyncio's own
    message repeats the address the caller already names."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
