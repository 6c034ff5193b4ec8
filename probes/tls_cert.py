"""What a step learns of the server's TLS certificate: when the leaf expires, and whether that
is soon enough to fail `expect: {tls_valid_for: …}`.

Read from the handshake's DER certificate (`getpeercert(binary_form=True)`), so it is known
with verification off too; parsed once per distinct certificate.
"""

from __future__ import annotations

import datetime
import ssl
import time
from functools import lru_cache

from cryptography import x509

from probes.errors import AssertionFailed


def not_after(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> float | None:
    """The leaf certificate's notAfter in unix seconds, or None without TLS or certificate."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return der_not_after(der) if der else None


@lru_cache(maxsize=256)
def der_not_after(der: bytes) -> float | None:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return cert.not_valid_after_utc.timestamp()


def check_valid_for(expiry: float | None, want_s: float | None, now: float | None = None) -> None:
    """Fail when the certificate expires within `want_s` (or there was none to look at)."""
    if want_s is None:
        return
    if expiry is None:
        raise AssertionFailed(f"no TLS certificate, want one valid for {_days(want_s)}")
    left = expiry - (time.time() if now is None else now)
    if left < want_s:
        when = datetime.datetime.fromtimestamp(expiry, datetime.UTC).isoformat(timespec="seconds")
        verb = "expired" if left < 0 else "expires in"
        span = _days(abs(left))
        raise AssertionFailed(
            f"certificate {verb} {span}{' ago' if left < 0 else ''} ({when}), "
            f"want valid for {_days(want_s)}"
        )


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f}d" if days >= 1 else f"{seconds / 3600:.1f}h"
