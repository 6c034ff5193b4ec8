"""The systems that call hopwatch back, run on the target's core: a webhook sender driven by the
monitor under test, and the chain target (HTTP → Kafka record → signed webhook).

    python -m benchmarks.senders webhooks --port P
        POST /go {"url": ..., "refs": [...]}: deliver one signed webhook per ref, 64 at a time
        over kept-alive connections, answer when all are delivered: {"sent": n, "failed": n}
    python -m benchmarks.senders chain --port P --kafka HOST:PORT --topic T
        POST /orders {"ref": r, "callback_url": u}: produce {"order_id": r} to the topic, send
        a signed webhook {"order_id": r, "status": "fulfilled"} to u, answer 201 {"id": r}

Deliveries are signed with Standard Webhooks (shared/CONTRACTS.md) using SECRET.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from itertools import count
from typing import Any

import aiohttp
from aiohttp import web

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
_KEY = base64.b64decode(SECRET.removeprefix("whsec_"))
_ids = count()


def signed(body: bytes) -> dict[str, str]:
    """Standard Webhooks headers for `body`, signed now with a fresh delivery id."""
    msg_id = f"msg_{next(_ids)}_{time.monotonic_ns()}"
    ts = str(int(time.time()))
    digest = hmac.new(_KEY, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        "Content-Type": "application/json",
    }


async def deliver(session: aiohttp.ClientSession, url: str, doc: dict[str, Any]) -> bool:
    body = json.dumps(doc).encode()
    try:
        async with session.post(url, data=body, headers=signed(body)) as resp:
            await resp.read()
            return resp.status < 300
    except aiohttp.ClientError:
        return False


async def ready(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def webhook_app() -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def go(request: web.Request) -> web.Response:
        job = await request.json()
        session = request.app[session_key]
        refs: list[str] = job["refs"]
        results: list[bool] = []

        async def sender(mine: list[str]) -> None:
            for ref in mine:
                results.append(await deliver(session, job["url"], {"ref": ref}))

        await asyncio.gather(*(sender(refs[i::64]) for i in range(64)))
        return web.json_response({"sent": sum(results), "failed": len(results) - sum(results)})

    async def lifecycle(app: web.Application) -> Any:
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        yield
        await app[session_key].close()

    app.router.add_post("/go", go)
    app.router.add_get("/ready", ready)
    app.cleanup_ctx.append(lifecycle)
    return app


def chain_app(bootstrap: str, topic: str) -> web.Application:
    from aiokafka import AIOKafkaProducer

    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)
    producer_key = web.AppKey("producer", AIOKafkaProducer)
    pending: set[asyncio.Task[bool]] = set()

    async def orders(request: web.Request) -> web.Response:
        doc = await request.json()
        ref = doc["ref"]
        await request.app[producer_key].send(topic, json.dumps({"order_id": ref}).encode())
        hook = {"order_id": ref, "status": "fulfilled"}
        task = asyncio.create_task(deliver(request.app[session_key], doc["callback_url"], hook))
        pending.add(task)
        task.add_done_callback(pending.discard)
        return web.json_response({"id": ref, "status": "pending"}, status=201)

    async def lifecycle(app: web.Application) -> Any:
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        app[producer_key] = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
        await app[producer_key].start()
        yield
        await app[producer_key].stop()
        await app[session_key].close()

    app.router.add_post("/orders", orders)
    app.router.add_get("/ready", ready)
    app.cleanup_ctx.append(lifecycle)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="webhook sender / chain target")
    parser.add_argument("role", choices=["webhooks", "chain"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kafka", default="")
    parser.add_argument("--topic", default="bench-orders")
    args = parser.parse_args(argv)
    import uvloop

    app = webhook_app() if args.role == "webhooks" else chain_app(args.kafka, args.topic)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(app, args.port))


async def _serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
