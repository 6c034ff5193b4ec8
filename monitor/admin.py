"""The admin listener: /metrics (OpenMetrics negotiated), health, the API and the status page.

It needs a bearer token unless bound to loopback; the public (webhook) listener never serves
any of these routes.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response(
                {"error": "bearer token required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="hopwatch"'},
            )
        return await handler(request)

    return require_token


def metrics_handler(registry: CollectorRegistry) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(registry)
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
