"""Webhook signature verification, so a forged or replayed delivery is never credited to a run.

Schemes (as each sender documents them), each a config model discriminated by `scheme`:

- `standard_webhooks`: `webhook-id`, `webhook-timestamp`, `webhook-signature` (space-separated
  `v1,<base64>` entries, any may match, which is how secret rotation works on the sender side);
- `stripe`: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`;
- `github`: `X-Hub-Signature-256: sha256=<hex>`, delivery id in `X-GitHub-Delivery`;
- `hmac`: a generic HMAC over the raw body (or `<timestamp><sep><body>`), hex or base64.

Every comparison is constant-time and made on the raw request bytes. Secrets may be written as
`${env:NAME}` or `${file:/path}` and are resolved at verification time; a secret never appears
in a message, a log line or a model's repr (the field is a `SecretStr`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Mapping
from typing import Annotated, Final, Literal, NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from probes import untrusted_json
from probes.durations import Duration
from probes.secrets import SecretUnavailable, resolve_secret

__all__ = [
    "GithubSignature",
    "HmacSignature",
    "SecretUnavailable",
    "SignatureConfig",
    "SignatureError",
    "StaleTimestamp",
    "StandardWebhooksSignature",
    "StripeSignature",
    "VerifiedDelivery",
    "resolve_secret",
    "verify",
]


class SignatureError(Exception):
    """The delivery is not authentic (missing, malformed, wrong or stale signature)."""

    why = "bad signature"  # how a refusal is summed up to the step that waited for it

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StaleTimestamp(SignatureError):
    """The signed timestamp is outside the tolerance: a replay, or a sender's clock adrift."""

    why = "stale timestamp"


class VerifiedDelivery(NamedTuple):
    """What a valid signature vouches for: the sender's delivery id and timestamp, if any.
    A named tuple: as immutable as a frozen dataclass, made in one C call per delivery
    instead of a `object.__setattr__` per field."""

    delivery_id: str | None
    timestamp: float | None  # unix seconds, as signed by the sender


class _Scheme(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: SecretStr = Field(
        description="The shared secret, or a reference `${env:NAME}` / `${file:/path}`; required."
    )


class StandardWebhooksSignature(_Scheme):
    """Standard Webhooks (standardwebhooks.com); the secret is `whsec_<base64>`."""

    scheme: Literal["standard_webhooks"] = Field(description="Selects this scheme.")
    tolerance: Duration = Field(
        default=300.0,
        description="How far webhook-timestamp may be from now, either way; default 5m.",
    )


class StripeSignature(_Scheme):
    """Stripe's `Stripe-Signature` header; the secret is the endpoint's `whsec_…` string as is."""

    scheme: Literal["stripe"] = Field(description="Selects this scheme.")
    tolerance: Duration = Field(
        default=300.0, description="How far `t=` may be from now, either way; default 5m."
    )


class GithubSignature(_Scheme):
    """GitHub's `X-Hub-Signature-256`; no timestamp, so replays are caught by delivery id only."""

    scheme: Literal["github"] = Field(description="Selects this scheme.")


class HmacSignature(_Scheme):
    """A generic HMAC signature header, for senders that follow no named scheme."""

    scheme: Literal["hmac"] = Field(description="Selects this scheme.")
    header: str = Field(description="Header carrying the signature; required.")
    algorithm: Literal["sha1", "sha256", "sha512"] = Field(
        default="sha256", description="HMAC hash; default sha256."
    )
    encoding: Literal["hex", "base64"] = Field(
        default="hex", description="How the digest is written; default hex."
    )
    prefix: str = Field(
        default="",
        description="Text before the digest in the header, e.g. `sha256=`; default none.",
    )
    timestamp_header: str | None = Field(
        default=None,
        description="Header with the unix-seconds timestamp; when set the signed message is "
        "`<timestamp><timestamp_separator><body>` and the timestamp must be within tolerance; "
        "default: none, the body alone is signed.",
    )
    timestamp_separator: str = Field(
        default=".", description="Between timestamp and body in the signed message; default `.`."
    )
    tolerance: Duration = Field(
        default=300.0, description="How far the timestamp may be from now; default 5m."
    )
    delivery_id_header: str | None = Field(
        default=None, description="Header with the sender's delivery id; default: none."
    )


SignatureConfig = Annotated[
    StandardWebhooksSignature | StripeSignature | GithubSignature | HmacSignature,
    Field(discriminator="scheme"),
]


def verify(
    config: SignatureConfig, headers: Mapping[str, str], raw_body: bytes, now: float
) -> VerifiedDelivery:
    """Check the delivery's signature against `config`; `now` is unix seconds.

    Raises SignatureError (safe to show to the sender) or SecretUnavailable (our config).
    """
    # aiohttp's headers already look up case-insensitively; other mappings are lowered once.
    kind = type(headers)
    ci = kind is CIMultiDictProxy or kind is CIMultiDict or isinstance(headers, _CI)
    lower = headers if ci else {k.lower(): v for k, v in headers.items()}
    if type(config) is StandardWebhooksSignature:  # the common scheme: no isinstance chain
        return _standard_webhooks(config, lower, raw_body, now)
    if isinstance(config, StandardWebhooksSignature):
        return _standard_webhooks(config, lower, raw_body, now)
    if isinstance(config, StripeSignature):
        return _stripe(config, lower, raw_body, now)
    if isinstance(config, GithubSignature):
        return _github(config, lower, raw_body)
    return _generic(config, lower, raw_body, now)


_CI: Final = (CIMultiDictProxy, CIMultiDict)


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name.lower())
    stripped = value.strip() if value is not None else ""
    if not stripped:
        raise SignatureError(f"missing header {name}")
    return stripped


def _timestamp(text: str, now: float, tolerance: float, what: str) -> float:
    try:
        stamp = float(int(text))
    except ValueError:
        raise SignatureError(f"{what} {text[:40]!r} is not unix seconds") from None
    if abs(now - stamp) > tolerance:
        raise StaleTimestamp(
            f"{what} is {now - stamp:+.0f}s from now, want within ±{tolerance:.0f}s"
        )
    return stamp


def _digest(key: bytes, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.digest(key, message, algorithm)  # one call into OpenSSL, no HMAC object


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) of `message`, from the key's two padded SHA-256 states, made
    once per key: `hmac.digest` has OpenSSL 3 set up a MAC context each time, which cost
    twice as many instructions as two copied hash states (callgrind, one webhook)."""
    inner, outer = _sha256_pads(key)
    digest = inner.copy()
    digest.update(message)
    wrapped = outer.copy()
    wrapped.update(digest.digest())
    return wrapped.digest()


_IPAD: Final = bytes(x ^ 0x36 for x in range(256))
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))


@functools.lru_cache(maxsize=64)
def _sha256_pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 states after the key XOR ipad and XOR opad blocks (HMAC's inner and outer)."""
    if len(key) > _SHA256_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_SHA256_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


_SHA256_BLOCK: Final = 64


@functools.lru_cache(maxsize=64)
def _whsec_key(secret: str) -> bytes:
    """A Standard Webhooks secret's key bytes; decoded once per secret value, which is read
    afresh on every delivery (a rotated file or variable takes effect at once)."""
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise SecretUnavailable("standard_webhooks secret is not whsec_<base64>") from None


# config's identity → (config, its tolerance, the key of its secret when that is written
# literally and decodes, else None)
_STANDARD: dict[int, tuple[StandardWebhooksSignature, float, bytes | None]] = {}
_STANDARD_MAX: Final = 256  # reloads make new configs: the old ones are dropped past this


def _standard_read(
    config: StandardWebhooksSignature,
) -> tuple[StandardWebhooksSignature, float, bytes | None]:
    """What every delivery reads of `config`, read once per (frozen) config: its tolerance,
    and the key of a literal secret (registered with the redactor by `resolve_secret`, as a
    delivery's reading did); a reference (`${env:…}`, `${file:…}`) or a literal that does not
    decode is resolved per delivery, so a rotated secret takes effect at once and a bad one
    fails every delivery, as before. Two pydantic attributes, `resolve_secret` and the key's
    cache were ~2,000 instructions a delivery."""
    known = _STANDARD.get(id(config))
    if known is not None and known[0] is config:
        return known
    key: bytes | None = None
    if "${" not in config.secret.get_secret_value():
        try:
            key = _whsec_key(resolve_secret(config.secret))
        except SecretUnavailable:
            key = None
    read = (config, float(config.tolerance), key)
    if len(_STANDARD) >= _STANDARD_MAX:
        _STANDARD.clear()
    _STANDARD[id(config)] = read
    return read


def _standard_webhooks(
    config: StandardWebhooksSignature, headers: Mapping[str, str], body: bytes, now: float
) -> VerifiedDelivery:
    # read inline (the names are lower case already): three `_header` calls were ~1 % of a
    # delivery's instructions; `_header` says which one is missing
    msg_id = (headers.get("webhook-id") or "").strip()
    stamp_text = (headers.get("webhook-timestamp") or "").strip()
    signatures = (headers.get("webhook-signature") or "").strip()
    if not (msg_id and stamp_text and signatures):
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            _header(headers, name)
    _, tolerance, key = _standard_read(config)
    stamp = _timestamp(stamp_text, now, tolerance, "webhook-timestamp")
    if key is None:  # a secret reference: read afresh for every delivery
        key = _whsec_key(resolve_secret(config.secret))
    signed = f"{msg_id}.{stamp_text}.".encode() + body
    expected = binascii.b2a_base64(_hmac_sha256(key, signed), newline=False)
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return VerifiedDelivery(msg_id, stamp)
    if {entry.partition(",")[0] for entry in signatures.split()} == {"v1a"}:
        raise SignatureError(
            "only v1a (ed25519) signatures given; hopwatch verifies v1 (HMAC) only"
        )
    raise SignatureError("no webhook-signature entry matches")


def _stripe(
    config: StripeSignature, headers: Mapping[str, str], body: bytes, now: float
) -> VerifiedDelivery:
    header = _header(headers, "Stripe-Signature")
    stamp_text: str | None = None
    given: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t":
            stamp_text = value
        elif name == "v1":
            given.append(value)
    if stamp_text is None or not given:
        raise SignatureError("Stripe-Signature lacks t= or v1=")
    stamp = _timestamp(stamp_text, now, config.tolerance, "Stripe-Signature t")
    key = resolve_secret(config.secret).encode()
    expected = _digest(key, stamp_text.encode() + b"." + body).hex().encode()
    if not any(hmac.compare_digest(v.encode(), expected) for v in given):
        raise SignatureError("no Stripe-Signature v1 matches")
    return VerifiedDelivery(_stripe_event_id(body), stamp)


def _stripe_event_id(body: bytes) -> str | None:
    """Stripe puts its idempotency key, the event id, in the body rather than a header."""
    try:
        doc = untrusted_json.loads(body)
    except untrusted_json.NotJson:
        return None
    event_id = doc.get("id") if isinstance(doc, dict) else None
    return event_id if isinstance(event_id, str) else None


def _github(config: GithubSignature, headers: Mapping[str, str], body: bytes) -> VerifiedDelivery:
    header = _header(headers, "X-Hub-Signature-256")
    key = resolve_secret(config.secret).encode()
    expected = b"sha256=" + _digest(key, body).hex().encode()
    if not hmac.compare_digest(header.encode(), expected):
        raise SignatureError("X-Hub-Signature-256 does not match")
    return VerifiedDelivery(headers.get("x-github-delivery"), None)


def _generic(
    config: HmacSignature, headers: Mapping[str, str], body: bytes, now: float
) -> VerifiedDelivery:
    header = _header(headers, config.header)
    stamp: float | None = None
    message = body
    if config.timestamp_header is not None:
        stamp_text = _header(headers, config.timestamp_header)
        stamp = _timestamp(stamp_text, now, config.tolerance, config.timestamp_header)
        message = (stamp_text + config.timestamp_separator).encode() + body
    digest = _digest(resolve_secret(config.secret).encode(), message, config.algorithm)
    written = digest.hex() if config.encoding == "hex" else base64.b64encode(digest).decode()
    expected = (config.prefix + written).encode()
    # Hex digests are case-insensitive in the wild; base64 is not.
    given = header.lower() if config.encoding == "hex" else header
    if config.encoding == "hex":
        expected = expected.lower()
    if not hmac.compare_digest(given.encode(), expected):
        raise SignatureError(f"{config.header} does not match")
    delivery_id = (
        headers.get(config.delivery_id_header.lower()) if config.delivery_id_header else None
    )
    return VerifiedDelivery(delivery_id, stamp)
