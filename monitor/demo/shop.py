"""A small shop API to watch, with faults that can be switched at runtime.

POST /orders → 201 {id, status: "pending"}; GET, PATCH {status}, DELETE /orders/{id}; GET /order
is a small order page whose form posts to /orders from the browser (the `checkout_ui` flow).
Faults: POST /faults {"latency_ms": 300, "status": 503, "wrong_body": true, "hang": true,
"paths": ["/orders"], "canary_only": true}, DELETE /faults to clear, GET /faults to read.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler


@dataclass
class Faults:
    """Switchable misbehaviour; the demo's worker and webhook sender read their own fields."""

    latency_ms: int = 0
    status: int | None = None
    wrong_body: bool = False
    hang: bool = False
    paths: list[str] = field(default_factory=list)  # empty: every API path
    canary_only: bool = False  # only requests marked X-Canary (the demo's canary variant)
    extra: dict[str, Any] = field(default_factory=dict)  # switches for the worker and webhooks

    def applies(self, request: web.Request) -> bool:
        if self.canary_only and "X-Canary" not in request.headers:
            return False
        return not self.paths or any(request.path.startswith(p) for p in self.paths)


FAULTS_KEY = web.AppKey("faults", Faults)
ORDERS_KEY = web.AppKey("orders", dict)
HOOKS_KEY = web.AppKey("order_hooks", list)
IDS_KEY: web.AppKey[Iterator[int]] = web.AppKey("ids")
LISTENERS_KEY = web.AppKey("fault_listeners", list)  # called after every change of faults
# Notified after every change of faults and at shutdown: what hanging requests wait on.
CHANGED_KEY = web.AppKey("faults_changed", asyncio.Condition)


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    faults = request.app[FAULTS_KEY]
    if request.path.startswith("/faults") or not faults.applies(request):
        return await handler(request)
    if faults.hang:
        # Until the fault is cleared or the shop stops: a request the client gave up on must
        # not outlive the fault (nor hold the shop's shutdown for aiohttp's 60 s).
        changed = request.app[CHANGED_KEY]
        async with changed:
            await changed.wait_for(lambda: not faults.hang)
        if request.transport is None or request.transport.is_closing():
            # The client gave up meanwhile: reading its body now would only log a traceback.
            return web.Response(status=499)
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    if faults.status is not None:
        return web.json_response({"error": "injected fault"}, status=faults.status)
    return await handler(request)


async def create_order(request: web.Request) -> web.StreamResponse:
    try:
        payload = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be JSON"}, status=400)
    if not isinstance(payload, dict):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    ids: Iterator[int] = request.app[IDS_KEY]
    order_id = f"ord-{next(ids)}"
    order = {
        "id": order_id,
        "status": "pending",
        "sku": payload.get("sku"),
        "ref": payload.get("ref"),
        "callback_url": payload.get("callback_url"),
        "created_at": time.time(),
    }
    request.app[ORDERS_KEY][order_id] = order
    for hook in request.app[HOOKS_KEY]:
        await hook(order, request)
    body = dict(order)
    if request.app[FAULTS_KEY].wrong_body and request.app[FAULTS_KEY].applies(request):
        body["status"] = "garbled"
    return web.json_response(body, status=201)


async def read_order(request: web.Request) -> web.StreamResponse:
    order = request.app[ORDERS_KEY].get(request.match_info["id"])
    if order is None:
        return web.json_response({"error": "no such order"}, status=404)
    body = dict(order)
    if request.app[FAULTS_KEY].wrong_body and request.app[FAULTS_KEY].applies(request):
        body["status"] = "garbled"
    return web.json_response(body)


async def update_order(request: web.Request) -> web.StreamResponse:
    order = request.app[ORDERS_KEY].get(request.match_info["id"])
    if order is None:
        return web.json_response({"error": "no such order"}, status=404)
    try:
        changes = await request.json()
        status = changes["status"]
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "body must be JSON with a status"}, status=400)
    if status not in ("pending", "fulfilled", "cancelled"):
        return web.json_response({"error": f"unknown status {status!r}"}, status=400)
    order["status"] = status
    return web.json_response(order)


async def delete_order(request: web.Request) -> web.StreamResponse:
    request.app[ORDERS_KEY].pop(request.match_info["id"], None)
    return web.Response(status=204)


async def order_page(request: web.Request) -> web.StreamResponse:
    page = resources.files("monitor.demo").joinpath("order.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html")


async def get_faults(request: web.Request) -> web.StreamResponse:
    return web.json_response(asdict(request.app[FAULTS_KEY]))


async def set_faults(request: web.Request) -> web.StreamResponse:
    try:
        changes = await request.json()
        faults = request.app[FAULTS_KEY]
        known = {f for f in asdict(faults) if f != "extra"}
        for key, value in changes.items():
            if key in known:
                setattr(faults, key, value)
            else:
                faults.extra[key] = value
    except (ValueError, AttributeError, TypeError) as exc:
        return web.json_response({"error": f"bad faults body: {exc}"}, status=400)
    await _notify(request.app)
    return web.json_response(asdict(faults))


async def _notify(app: web.Application) -> None:
    for listener in app[LISTENERS_KEY]:
        await listener(app[FAULTS_KEY])
    async with app[CHANGED_KEY]:
        app[CHANGED_KEY].notify_all()


async def _release_hangs(app: web.Application) -> None:
    """At shutdown (before the server waits for its handlers): no request hangs any longer."""
    app[FAULTS_KEY].hang = False
    async with app[CHANGED_KEY]:
        app[CHANGED_KEY].notify_all()


async def clear_faults(request: web.Request) -> web.StreamResponse:
    faults = request.app[FAULTS_KEY]
    for key, value in asdict(Faults()).items():
        setattr(faults, key, value)
    await _notify(request.app)
    return web.json_response(asdict(faults))


def build_shop_app(faults: Faults | None = None) -> web.Application:
    app = web.Application(middlewares=[fault_middleware])
    app[FAULTS_KEY] = faults or Faults()
    app[ORDERS_KEY] = {}
    app[HOOKS_KEY] = []
    app[LISTENERS_KEY] = []
    app[IDS_KEY] = itertools.count(1)
    app[CHANGED_KEY] = asyncio.Condition()
    app.on_shutdown.append(_release_hangs)
    app.router.add_post("/orders", create_order)
    app.router.add_get("/orders/{id}", read_order)
    app.router.add_patch("/orders/{id}", update_order)
    app.router.add_delete("/orders/{id}", delete_order)
    app.router.add_get("/order", order_page)
    app.router.add_get("/faults", get_faults)
    app.router.add_post("/faults", set_faults)
    app.router.add_delete("/faults", clear_faults)
    return app
