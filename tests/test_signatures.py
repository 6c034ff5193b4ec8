"""Webhook signature schemes against the specs' vectors, tolerances, rotation and secret refs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from probes.signatures import (
    GithubSignature,
    SecretUnavailable,
    SignatureConfig,
    SignatureError,
    StandardWebhooksSignature,
    resolve_secret,
    verify,
)
from probes.signatures import _hmac_sha256 as _hmac_sha256
from tests.fixtures.webhooks import SW_SECRET, sign_standard

CONFIG: TypeAdapter[Any] = TypeAdapter(SignatureConfig)

SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TS = 1614265330
SW_BODY = b'{"test": 2432232314}'
SW_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

GH_SECRET = "It's a Secret to Everybody"
GH_BODY = b"Hello, World!"
GH_SIG = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

STRIPE_SECRET = "whsec_test_secret"


def sw_headers(signature: str = SW_SIG, **overrides: str) -> dict[str, str]:
    headers = {"webhook-id": SW_ID, "webhook-timestamp": str(SW_TS), "webhook-signature": signature}
    headers.update(overrides)
    return headers


def standard(**extra: Any) -> Any:
    return CONFIG.validate_python({"scheme": "standard_webhooks", "secret": SW_SECRET, **extra})


def stripe_header(body: bytes, t: int, secret: str = STRIPE_SECRET, extra: str = "") -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},{extra}v1={mac}"


# -- Standard Webhooks ----------------------------------------------------------------------


def test_standard_webhooks_spec_vector() -> None:
    assert sign_standard(SW_SECRET, SW_ID, SW_TS, SW_BODY) == SW_SIG  # our helper agrees too
    delivery = verify(standard(), sw_headers(), SW_BODY, now=SW_TS)
    assert delivery.delivery_id == SW_ID
    assert delivery.timestamp == SW_TS


@pytest.mark.parametrize("key_len", [0, 1, 24, 32, 63, 64, 65, 200])
def test_standard_webhooks_hmac_from_padded_states_is_rfc_2104(key_len: int) -> None:
    """The HMAC made from cached padded hash states equals OpenSSL's for keys shorter than,
    as long as and longer than SHA-256's block, and a key's states are reused unchanged."""
    key = bytes(range(7, 7 + key_len)) if key_len < 200 else bytes(key_len)
    for message in (b"", b"msg_1.1614265330.{}", bytes(range(256)) * 5):
        assert _hmac_sha256(key, message) == hmac.digest(key, message, "sha256")


def test_standard_webhooks_several_signatures_one_matches() -> None:
    other = sign_standard("whsec_" + base64.b64encode(b"old key").decode(), SW_ID, SW_TS, SW_BODY)
    headers = sw_headers(f"{other} v1a,c29tZQ== {SW_SIG}")
    assert verify(standard(), headers, SW_BODY, now=SW_TS).delivery_id == SW_ID


def test_standard_webhooks_header_names_are_case_insensitive() -> None:
    headers = {k.title(): v for k, v in sw_headers().items()}
    assert verify(standard(), headers, SW_BODY, now=SW_TS).delivery_id == SW_ID


@pytest.mark.parametrize(
    ("headers", "body", "now", "message"),
    [
        (sw_headers(), b'{"test": 2432232315}', SW_TS, "no webhook-signature entry matches"),
        (sw_headers("v1,Zm9v"), SW_BODY, SW_TS, "no webhook-signature entry matches"),
        (sw_headers(), SW_BODY, SW_TS + 301, "webhook-timestamp is +301s from now"),
        (sw_headers(), SW_BODY, SW_TS - 301, "webhook-timestamp is -301s from now"),
        (sw_headers(**{"webhook-timestamp": "soon"}), SW_BODY, SW_TS, "is not unix seconds"),
        ({"webhook-id": SW_ID, "webhook-timestamp": str(SW_TS)}, SW_BODY, SW_TS,
         "missing header webhook-signature"),
        (sw_headers("v1a,c29tZQ=="), SW_BODY, SW_TS, "v1a (ed25519)"),
    ],
    ids=["tampered", "wrong", "stale", "future", "bad-ts", "missing", "v1a-only"],
)  # fmt: skip
def test_standard_webhooks_refusals(
    headers: dict[str, str], body: bytes, now: float, message: str
) -> None:
    with pytest.raises(SignatureError, match=re.escape(message)):
        verify(standard(), headers, body, now=now)


def test_standard_webhooks_tolerance_is_configurable() -> None:
    assert verify(standard(tolerance="10m"), sw_headers(), SW_BODY, now=SW_TS + 599)
    with pytest.raises(SignatureError):
        verify(standard(tolerance="10s"), sw_headers(), SW_BODY, now=SW_TS + 11)


# -- Stripe ---------------------------------------------------------------------------------


def stripe(**extra: Any) -> Any:
    return CONFIG.validate_python({"scheme": "stripe", "secret": STRIPE_SECRET, **extra})


def test_stripe_signature_and_event_id() -> None:
    body = b'{"id": "evt_123", "type": "charge.succeeded"}'
    header = stripe_header(body, 1_700_000_000)
    delivery = verify(stripe(), {"Stripe-Signature": header}, body, now=1_700_000_100)
    assert delivery.delivery_id == "evt_123"
    assert delivery.timestamp == 1_700_000_000


def test_stripe_rotation_any_v1_matches() -> None:
    body = b'{"id": "evt_1"}'
    stale = hmac.new(b"old", b"1700000000." + body, hashlib.sha256).hexdigest()
    header = stripe_header(body, 1_700_000_000, extra=f"v1={stale},v0=abc,")
    assert verify(stripe(), {"stripe-signature": header}, body, now=1_700_000_000)


@pytest.mark.parametrize(
    ("header", "now", "message"),
    [
        (stripe_header(b"{}", 1_700_000_000), 1_700_000_301, "t is \\+301s from now"),
        (stripe_header(b"{}", 1_700_000_000, secret="other"), 1_700_000_000, "no Stripe"),
        ("t=1700000000", 1_700_000_000, "lacks t= or v1="),
        ("v1=abcd", 1_700_000_000, "lacks t= or v1="),
    ],
    ids=["outside-tolerance", "wrong-secret", "no-v1", "no-t"],
)
def test_stripe_refusals(header: str, now: float, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        verify(stripe(), {"Stripe-Signature": header}, b"{}", now=now)


def test_stripe_tolerance_is_configurable() -> None:
    header = stripe_header(b"{}", 1_700_000_000)
    assert verify(stripe(tolerance="1h"), {"Stripe-Signature": header}, b"{}", 1_700_003_000)


# -- GitHub ---------------------------------------------------------------------------------


def test_github_spec_vector() -> None:
    config = CONFIG.validate_python({"scheme": "github", "secret": GH_SECRET})
    headers = {"X-Hub-Signature-256": GH_SIG, "X-GitHub-Delivery": "72d3162e-cc78"}
    delivery = verify(config, headers, GH_BODY, now=0)
    assert delivery.delivery_id == "72d3162e-cc78"
    assert delivery.timestamp is None


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Hub-Signature-256": GH_SIG.replace("757", "758")}, "does not match"),
        ({"X-Hub-Signature": "sha1=abc"}, "missing header X-Hub-Signature-256"),
    ],
    ids=["wrong", "missing"],
)
def test_github_refusals(headers: dict[str, str], message: str) -> None:
    config = GithubSignature(scheme="github", secret=GH_SECRET)  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match=message):
        verify(config, headers, GH_BODY, now=0)


# -- generic HMAC ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "signed"),
    [
        ({}, hmac.new(b"k", b"{}", hashlib.sha256).hexdigest()),
        ({}, hmac.new(b"k", b"{}", hashlib.sha256).hexdigest().upper()),
        ({"algorithm": "sha512", "encoding": "base64"},
         base64.b64encode(hmac.new(b"k", b"{}", hashlib.sha512).digest()).decode()),
        ({"prefix": "sha1="}, "sha1=" + hmac.new(b"k", b"{}", hashlib.sha1).hexdigest()),
        ({"timestamp_header": "X-Ts"}, hmac.new(b"k", b"1000.{}", hashlib.sha256).hexdigest()),
        ({"timestamp_header": "X-Ts", "timestamp_separator": ":"},
         hmac.new(b"k", b"1000:{}", hashlib.sha256).hexdigest()),
    ],
    ids=["hex", "hex-upper", "sha512-base64", "prefix", "timestamp", "separator"],
)  # fmt: skip
def test_generic_hmac_variants(options: dict[str, Any], signed: str) -> None:
    if options.get("prefix"):
        options = {**options, "algorithm": "sha1"}
    config = CONFIG.validate_python(
        {
            "scheme": "hmac",
            "secret": "k",
            "header": "X-Sig",
            "delivery_id_header": "X-Id",
            **options,
        }
    )
    headers = {"x-sig": signed, "X-Ts": "1000", "X-Id": "d-1"}
    delivery = verify(config, headers, b"{}", now=1000)
    assert delivery.delivery_id == "d-1"
    assert delivery.timestamp == (1000 if "timestamp_header" in options else None)


def test_generic_hmac_refusals() -> None:
    config = CONFIG.validate_python(
        {"scheme": "hmac", "secret": "k", "header": "X-Sig", "timestamp_header": "X-Ts"}
    )
    good = hmac.new(b"k", b"1000.{}", hashlib.sha256).hexdigest()
    with pytest.raises(SignatureError, match="X-Sig does not match"):
        verify(config, {"X-Sig": good, "X-Ts": "1000"}, b"{ }", now=1000)
    with pytest.raises(SignatureError, match="X-Ts is \\+400s from now"):
        verify(config, {"X-Sig": good, "X-Ts": "1000"}, b"{}", now=1400)
    with pytest.raises(SignatureError, match="missing header X-Ts"):
        verify(config, {"X-Sig": good}, b"{}", now=1000)


# -- config and secrets ---------------------------------------------------------------------


def test_secret_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("HOPWATCH_TEST_WHSEC", SW_SECRET)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SW_SECRET + "\n")
    for ref in ("${env:HOPWATCH_TEST_WHSEC}", f"${{file:{secret_file}}}"):
        assert resolve_secret(ref) == SW_SECRET
        config = standard(secret=ref)
        assert verify(config, sw_headers(), SW_BODY, now=SW_TS).delivery_id == SW_ID
    assert resolve_secret("plain") == "plain"


def test_unresolvable_secret_names_the_reference(tmp_path: Any) -> None:
    with pytest.raises(SecretUnavailable, match="environment variable HOPWATCH_NOPE is not set"):
        verify(standard(secret="${env:HOPWATCH_NOPE}"), sw_headers(), SW_BODY, now=SW_TS)
    with pytest.raises(SecretUnavailable, match="secret file"):
        resolve_secret(f"${{file:{tmp_path / 'missing'}}}")


def test_secret_never_shown() -> None:
    config = standard()
    assert SW_SECRET not in repr(config)
    assert SW_SECRET not in str(config.model_dump())
    for headers, now in [(sw_headers("v1,Zm9v"), SW_TS), (sw_headers(), SW_TS + 999)]:
        with pytest.raises(SignatureError) as caught:
            verify(config, headers, SW_BODY, now=now)
        assert SW_SECRET not in str(caught.value)
        assert SW_SECRET.removeprefix("whsec_") not in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"scheme": "svix", "secret": "x"}, "does not match any of the expected tags"),
        ({"scheme": "github"}, "secret\n  Field required"),
        ({"scheme": "github", "secret": "x", "header": "X"}, "Extra inputs are not permitted"),
        ({"scheme": "hmac", "secret": "x"}, "header\n  Field required"),
        ({"scheme": "hmac", "secret": "x", "header": "X", "algorithm": "md5"}, "'sha1'"),
        ({"scheme": "stripe", "secret": "x", "tolerance": "soon"}, "not a duration"),
    ],
    ids=["unknown-scheme", "no-secret", "extra", "hmac-no-header", "md5", "bad-tolerance"],
)
def test_bad_configs(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        CONFIG.validate_python(raw)
    assert message in str(caught.value)


def test_models_are_frozen_and_comparable() -> None:
    a, b = standard(), standard()
    assert a == b and hash(a) == hash(b)
    assert isinstance(a, StandardWebhooksSignature)
    with pytest.raises(ValidationError):
        a.tolerance = 1  # type: ignore[misc]
