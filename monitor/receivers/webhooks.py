"""The webhook receiver: the public listener's paths, which authenticate deliveries and hand
them to the correlator without ever waiting on a run. A plain delivery is read and answered by
the listener's own connection (`monitor.receivers.wire`), any other request by aiohttp (an
aiohttp route); both go through `_PathHandler.accept` once the body is whole.

Answers, in the order they are decided:

    400  head refused by the parser, body broken (bad chunking or encoding)
                                                           counted malformed (see guard)
    408  body not read whole within `body_timeout`          counted malformed
    413  body over `max_body` bytes                        counted malformed
    401  missing or bad signature (no config verifies)     counted bad_signature, never offered
    500  a signature secret cannot be resolved (ours)      counted bad_signature, logged
    415  content type neither JSON nor XML                 counted malformed
         (application/json, +json; application/xml, text/xml, +xml)
    400  body is not JSON (or nests or weighs past the limits of `probes.untrusted_json`),
         or not XML hopwatch will read (malformed, or declaring entities: probes.xml_checks)
                                                           counted malformed
    a client that goes away mid-body gets no answer       counted malformed
    417  an `Expect` other than 100-continue (aiohttp)     counted malformed
    404  unknown path (aiohttp's router); 405 not POST     not counted
    the configured answer (default 202) otherwise, whatever the correlation outcome: a late,
         duplicate or unmatched delivery is still acknowledged, because senders retry non-2xx
         answers and a retry storm would only turn one fault into many. The correlator counts
         the outcome (matched, unmatched, duplicate, late).

Several steps (of one flow or several) may share a path: a delivery is accepted if any of the
path's distinct signature configs verifies it; if any step on the path declares no signature,
the path accepts unsigned deliveries (logged at install). Trace-context headers (`traceparent`,
`tracestate`, `baggage`) stay in `Arrival.headers` as received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import ClientPayloadError, web
from aiohttp.helpers import parse_content_type
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_urldispatcher import _default_expect_handler  # 100 Continue, else 417

from monitor.receivers.answer import Answer, PreparedAnswer
from monitor.receivers.guard import BODY_TIMEOUT, FRONT, Handler
from monitor.receivers.wire import BODY_LATE, TEXT
from monitor.rejects import RejectLog
from probes import KINDS, untrusted_json
from probes.arrivals import Arrival
from probes.errors import ConfigError
from probes.kinds import WebhookRoute
from probes.secrets import register_secret
from probes.signatures import (
    SecretUnavailable,
    SignatureConfig,
    SignatureError,
    VerifiedDelivery,
    resolve_secret,
    verify,
)
from probes.xml_checks import NotXml, parse_xml

if TYPE_CHECKING:
    from collections.abc import Mapping

    from multidict import CIMultiDictProxy

    from monitor.metric_types import LabelledCounter


log = logging.getLogger(__name__)

MAX_BODY: Final = 1024 * 1024
_UNSIGNED_ID_HEADERS: Final = ("webhook-id", "x-github-delivery")
_WHY_REFUSED: Final = {413: "too large", 415: "wrong content type", 400: "not JSON"}


class Inbox(Protocol):
    """Where a verified delivery goes: the correlator, or in a cluster the membership, which
    hands it to the replica whose run waits for it."""

    def offer(self, arrival: Arrival) -> str: ...

    def refused(self, channel: str, why: str, *, signature: bool) -> None:
        """A delivery on `channel` was refused (`why`), so a waiting step can say so."""
        ...


def routes_from_steps(steps: Iterable[Any]) -> list[WebhookRoute]:
    """One route per distinct (path, signature, answer) among the steps whose kind listens for
    webhooks."""
    routes: list[WebhookRoute] = []
    for step in steps:
        listens = KINDS[step.kind].listens
        if listens is None:
            continue
        route = listens(step)
        if not any(_same_route(route, r) for r in routes):
            routes.append(route)
    return routes


def _same_route(a: WebhookRoute, b: WebhookRoute) -> bool:
    return (a.path, a.signature, a.respond_status, a.respond_body) == (
        b.path,
        b.signature,
        b.respond_status,
        b.respond_body,
    )


def install_webhook_routes(
    app: web.Application,
    routes: Iterable[WebhookRoute],
    correlator: Inbox,
    arrivals_counter: LabelledCounter | None,
    *,
    max_body: int = MAX_BODY,
    body_timeout: float = BODY_TIMEOUT,
    reject_log: RejectLog | None = None,
) -> WebhookPaths:
    """Serve every distinct path of `routes` (POST only); the returned `WebhookPaths` takes new
    routes while the app serves (a reload). Raises ConfigError when steps sharing a path want
    different answers (one delivery can get only one). `reject_log` counts and logs what the
    listener refuses below the handler (give the public runner's); one is made otherwise."""
    rejects = reject_log if reject_log is not None else RejectLog(arrivals_counter)
    paths = WebhookPaths(correlator, arrivals_counter, max_body, body_timeout, rejects)
    paths.set_routes(routes)
    app.router.add_route("*", "/{path:.*}", paths.dispatch, expect_handler=paths.expect)
    app[FRONT] = paths  # the public runner's ways past the router (guard.FRONT)
    return paths


class WebhookPaths:
    """The public listener's paths, looked up per request, so that a reload can add and remove
    paths of a running listener (aiohttp's own router is frozen once it serves)."""

    def __init__(
        self,
        correlator: Inbox,
        counter: LabelledCounter | None,
        max_body: int,
        body_timeout: float,
        rejects: RejectLog,
    ) -> None:
        self._inbox, self._counter, self._max_body = correlator, counter, max_body
        self._body_timeout, self._rejects = body_timeout, rejects
        self._handlers: dict[str, _PathHandler] = {}

    def set_routes(self, routes: Iterable[WebhookRoute]) -> None:
        """Replace the served paths at once; on a ConfigError the old ones stay."""
        by_path: dict[str, list[WebhookRoute]] = {}
        for route in routes:
            by_path.setdefault(route.path, []).append(route)
        handlers = {}
        for path, group in by_path.items():
            handler = _PathHandler(path, group, self._inbox, self._counter, self._max_body)
            handler.body_timeout = self._body_timeout
            handler.rejects = self._rejects
            handlers[path] = handler
        self._handlers = handlers

    @property
    def paths(self) -> list[str]:
        return sorted(self._handlers)

    def served(self, path: str) -> _PathHandler | None:
        return self._handlers.get(path)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        handler = self._handlers.get(request.path)
        if handler is None:
            raise web.HTTPNotFound()
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        return await handler.handle(request)

    async def expect(self, request: web.Request) -> None:
        """aiohttp's answer to an `Expect` header (`100 Continue`, or 417 to anything else),
        with a 417 to a POST on a served path counted malformed, as the listener's other
        refusals below the handler are."""
        try:
            await _default_expect_handler(request)
        except web.HTTPExpectationFailed:
            if request.method == "POST" and request.path in self._handlers:
                said = request.headers.get(_EXPECT, "")
                self._rejects.reject("bad_request", f"{request.path}: Expect {said!r}")
            raise

    def front(self, rest: Handler) -> Handler:
        """A handler that gives a POST to a served path straight to its `_PathHandler` (no
        router, no match info, no coroutine of its own) and anything else to `rest`, the
        app's handler: unknown paths and other methods get the router's 404 and 405, and an
        `Expect: 100-continue` its interim answer."""
        handlers = self  # set_routes replaces the dict: read it per request

        def serve(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            handler = handlers._handlers.get(request.path)
            if handler is None or request.method != "POST" or _EXPECT in request.headers:
                return rest(request)
            return handler.handle(request)

        return serve


_EXPECT: Final = "Expect"


class _PathHandler:
    """Receives every delivery on one path."""

    def __init__(
        self,
        path: str,
        routes: list[WebhookRoute],
        correlator: Inbox,
        counter: LabelledCounter | None,
        max_body: int,
    ) -> None:
        answers = {(r.respond_status, json.dumps(r.respond_body, sort_keys=True)) for r in routes}
        if len(answers) > 1:
            steps = ", ".join(r.step or "?" for r in routes)
            raise ConfigError(
                [f"webhook path {path}: steps {steps} give different respond answers"]
            )
        self.path = path
        self.correlator = correlator
        self.counter = counter
        self.max_body = max_body
        self.body_timeout = BODY_TIMEOUT
        self.rejects = RejectLog(counter)
        self._refused: dict[str, Any] = {}  # the counter's child per outcome, looked up once
        self.answer = routes[0]
        self._answer = _prepared_answer(self.answer)
        self.signatures: list[SignatureConfig] = []
        for route in routes:
            if route.signature is not None and route.signature not in self.signatures:
                self.signatures.append(route.signature)
                _register_secret(route.signature)
        unsigned = [r.step or "?" for r in routes if r.signature is None]
        self.unsigned_ok = bool(unsigned)
        # the one config that verifies every delivery (the usual path): `verify` called
        # directly, which is what `_verify` comes to for it
        self._only = self.signatures[0] if len(self.signatures) == 1 and not unsigned else None
        if unsigned and self.signatures:
            log.warning(
                "webhook path %s accepts unsigned deliveries: step(s) %s declare no signature",
                path,
                ", ".join(unsigned),
            )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        received_at = time.monotonic()
        received_unix = time.time()
        content = request.content
        try:
            if content.is_eof():  # the usual small delivery came whole with its head: no wait
                body = _whole_body(request, self.max_body)
            else:
                async with asyncio.timeout(self.body_timeout):
                    body = await _read_body(request, self.max_body)
        except TimeoutError:
            self.body_late()
            return _closing(408, BODY_LATE)
        except (OSError, ClientPayloadError) as exc:  # the client went away mid-body
            self.cut_off(type(exc).__name__)
            return _closing(400, "connection lost")
        except (HttpProcessingError, web.RequestPayloadError) as exc:  # chunking, encoding
            self.rejects.reject("bad_body", f"{self.path}: {type(exc).__name__}")
            return _closing(400, "body unreadable (broken chunking or content encoding)")
        if body is None:
            return PreparedAnswer(
                self._refuse(413, "malformed", f"body over {self.max_body} bytes")
            )
        answer = self.accept(request.headers, body, request.remote, received_at, received_unix)
        return PreparedAnswer(answer)  # a fresh one: aiohttp's responses are single use

    def body_late(self) -> None:
        """The body was not whole within `body_timeout` (the caller answers 408 and closes)."""
        late = f"{self.path}: body not whole in {self.body_timeout:g}s"
        self.rejects.reject("body_timeout", late)

    def cut_off(self, why: str) -> None:
        """The client went away mid-body (no answer)."""
        self.rejects.reject("disconnect", f"{self.path}: {why}")

    def accept(
        self,
        headers: CIMultiDictProxy[str],
        body: bytes,
        remote: str | None,
        received_at: float,
        received_unix: float,
    ) -> Answer:
        """A whole delivery, from either way in (aiohttp's request or `receivers.wire`):
        verified, parsed, offered; the answer it gets. Never waits."""
        only = self._only
        try:
            if only is not None:
                verified = verify(only, headers, body, received_unix)
            else:
                verified = self._verify(headers, body, received_unix)
        except SignatureError as exc:
            return self._refuse(401, "bad_signature", f"signature: {exc.message}", exc.why)
        except SecretUnavailable as exc:
            log.error("webhook path %s: cannot verify deliveries: %s", self.path, exc)
            return self._refuse(500, "bad_signature", "signature secret unavailable")
        doc: Any = None
        root: Any = None
        content_type = _content_type(headers)
        if _is_json(content_type):
            try:
                doc = untrusted_json.loads(body, max_bytes=self.max_body)
            except untrusted_json.NotJson as exc:
                return self._refuse(400, "malformed", f"body is not JSON: {exc}")
        elif _is_xml(content_type):
            try:  # refused here, so a step never sees a hostile document
                root = parse_xml(body)
            except NotXml as exc:
                return self._refuse(400, "malformed", str(exc), "XML refused")
        else:
            return self._refuse(
                415,
                "malformed",
                f"content type {content_type!r}, want application/json or XML",
            )
        # positional, in the fields' order: a class called with keywords has CPython 3.11
        # build a dict of them and unpack it again (~1,800 instructions for these ten)
        arrival = Arrival(
            "webhook",  # source
            self.path,  # channel
            received_at,
            received_unix,
            headers,
            body,
            doc,  # json
            verified.delivery_id,
            None,  # key (Kafka's)
            {"remote": remote, "sender_timestamp": verified.timestamp},  # meta
            root,  # xml
        )
        self.correlator.offer(arrival)
        return self._answer

    def _verify(self, headers: Mapping[str, str], body: bytes, now: float) -> VerifiedDelivery:
        """The first verifying config's delivery; raises the first config's error otherwise."""
        if self.unsigned_ok:
            return VerifiedDelivery(_unsigned_delivery_id(headers), None)
        first: SignatureError | None = None
        unavailable: SecretUnavailable | None = None
        for config in self.signatures:
            try:
                return verify(config, headers, body, now)
            except SignatureError as exc:
                first = first or exc
            except SecretUnavailable as exc:
                unavailable = unavailable or exc
        if unavailable is not None:
            raise unavailable
        assert first is not None  # self.signatures is never empty when unsigned_ok is False
        raise first

    def _refuse(self, status: int, outcome: str, text: str, why: str | None = None) -> Answer:
        # The step waiting on this path learns of it: a delivery refused here is why a step
        # saw nothing (a rotated secret is not a dead sender). Our own 500 is not the sender's.
        why = why or _WHY_REFUSED.get(status)
        # The correlator keeps a tally (in a cluster, the owning replica's correlator).
        if why is not None:
            self.correlator.refused(self.path, why, signature=outcome == "bad_signature")
        if self.counter is not None:
            child = self._refused.get(outcome)
            if child is None:
                child = self._refused[outcome] = self.counter.labels(
                    source="webhook", outcome=outcome
                )
            child.inc()
        return Answer(status, (text + "\n").encode(), TEXT)  # as aiohttp's `text=` sends it


def _whole_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The body already read whole with the head, or None when it exceeds `limit`: no timer
    and no await, since nothing is left to wait for."""
    body = request.content.read_nowait()
    return None if len(body) > limit else body


async def _read_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The raw body, or None as soon as it is known to exceed `limit` (not read further)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    content = request.content
    if content.is_eof():
        return _whole_body(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _register_secret(signature: SignatureConfig) -> None:
    """Have the signing secret masked from the start, not only once a delivery needs it: a
    target may echo it in an error body before any delivery came."""
    try:
        secret = resolve_secret(signature.secret)  # registers it with the redactor
    except SecretUnavailable:
        return  # said (and counted) when a delivery needs it
    if secret.startswith("whsec_"):
        register_secret(secret.removeprefix("whsec_"))  # the key alone is as secret


def _closing(status: int, text: str) -> web.Response:
    """An answer after which the connection closes: what is left of its body is unknown."""
    response = web.Response(status=status, text=text + "\n")
    response.force_close()
    return response


def _content_type(headers: Mapping[str, str]) -> str:
    """The Content-Type's media type as aiohttp's `request.content_type` reads it (lower case,
    application/octet-stream when missing or unreadable), parsed once per distinct header."""
    raw = headers.get("Content-Type")
    parsed = _CONTENT_TYPES.get(raw)
    if parsed is None:
        parsed = "application/octet-stream" if raw is None else parse_content_type(raw)[0]
        if len(_CONTENT_TYPES) >= 256:  # senders' headers, so bounded
            _CONTENT_TYPES.clear()
        _CONTENT_TYPES[raw] = parsed
    return parsed


_CONTENT_TYPES: dict[str | None, str] = {}


def _is_json(content_type: str) -> bool:
    """application/json or application/*+json."""
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


def _is_xml(content_type: str) -> bool:
    """application/xml, text/xml or application/*+xml (SOAP 1.2's application/soap+xml)."""
    return content_type in ("application/xml", "text/xml") or (
        content_type.startswith("application/") and content_type.endswith("+xml")
    )


def _unsigned_delivery_id(headers: Mapping[str, str]) -> str | None:
    """Unsigned senders may still name their deliveries; use the common headers for replays."""
    for name in _UNSIGNED_ID_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return None


def _prepared_answer(route: WebhookRoute) -> Answer:
    """The configured answer, encoded once: a text body as `text=` sends it, a mapping or list
    as `web.json_response` does."""
    body = route.respond_body
    if body is None:
        return Answer(route.respond_status)
    if isinstance(body, str):
        return Answer(route.respond_status, body.encode(), "text/plain; charset=utf-8")
    return Answer(
        route.respond_status, json.dumps(body).encode(), "application/json; charset=utf-8"
    )
