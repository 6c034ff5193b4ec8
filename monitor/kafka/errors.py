"""The one place aiokafka's (and the socket's) exceptions become step failures."""

from __future__ import annotations

import socket
import ssl

from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
)

from probes.errors import (
    ConnectError,
    DnsError,
    OtherFailure,
    StepFailed,
    Timeout,
    TlsError,
    drop_frames,
)

__all__ = ["describe", "translate"]


def describe(exc: BaseException) -> str:
    """`Name: message`, once: aiokafka's own messages already start with the class name."""
    name, text = type(exc).__name__, str(exc)
    if text.startswith(name):
        return text
    return f"{name}: {text}" if text else name


def translate(exc: BaseException, what: str) -> StepFailed:
    """The step failure for `exc`, met while doing `what` (e.g. `produce to main/orders`)."""
    drop_frames(exc)
    detail = f"{what}: {describe(exc)}"
    if isinstance(exc, KafkaTimeoutError | RequestTimedOutError | TimeoutError):
        return Timeout(detail)
    if isinstance(exc, ssl.SSLError):
        return TlsError(detail)
    if isinstance(exc, socket.gaierror):
        return DnsError(detail)
    if isinstance(exc, KafkaConnectionError | NodeNotReadyError | OSError):
        return ConnectError(detail)
    return OtherFailure(detail)
