"""The admin listener: /metrics (its format negotiated), health, the API and the status page.

It needs a bearer token unless bound to loopback; the public (webhook) listener never serves
any of these routes.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from monitor.metric_text import choose_encoder

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
COOKIE = "hopwatch_token"


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_middleware(token: str) -> Middleware:
    """Bearer header for machines; `?token=` once (then a cookie) for browsers and Flagger,
    whose webhooks carry no headers."""
    expected = token.encode()

    def given(request: web.Request) -> tuple[bytes, bool]:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth.removeprefix("Bearer ").encode(), False
        if "token" in request.query:
            return request.query["token"].encode(), True
        return request.cookies.get(COOKIE, "").encode(), False

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        value, from_query = given(request)
        if not hmac.compare_digest(value, expected):
            return web.json_response(
                {"error": "bearer token required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="hopwatch"'},
            )
        response = await handler(request)
        if from_query and request.method == "GET" and not request.path.startswith("/api/"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return response

    return require_token


def metrics_handler(registry: CollectorRegistry) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        # Encoding 10,000 flows takes a few hundred ms of CPU: in a thread, the event loop
        # keeps probing between GIL switches instead of stalling for the whole scrape.
        body = await asyncio.to_thread(encoder, registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle


def build_admin_app(
    registry: CollectorRegistry,
    *,
    ready: Callable[[], bool],
    token: str | None = None,
) -> web.Application:
    """The admin app's own routes; the API and status page install theirs onto it."""
    middlewares = [token_middleware(token)] if token else []
    app = web.Application(middlewares=middlewares)  # type: ignore[arg-type]

    async def healthz(_: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.StreamResponse:
        ok = ready()
        return web.json_response(
            {"status": "ready" if ok else "starting"}, status=200 if ok else 503
        )

    app.router.add_get("/metrics", metrics_handler(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
