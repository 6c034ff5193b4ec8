"""The systems that call hopwatch back, run on the target's core: a webhook sender driven by the
monitor under test, and the chain target (HTTP → Kafka record → signed webhook).

    python -m benchmarks.senders webhooks --port P
        POST /go {"url": ..., "refs": [...]}: deliver one signed webhook per ref, 64 at a time
        over kept-alive connections, answer when all are delivered: {"sent": n, "failed": n}.
        The deliveries go out through a bare asyncio protocol (RawSender), far cheaper per
        request than any HTTP server, so the sender's core never limits the measured one.
    python -m benchmarks.senders chain --port P --kafka HOST:PORT --topic T
        POST /orders {"ref": r, "callback_url": u}: produce {"order_id": r} to the topic, send
        a signed webhook {"order_id": r, "status": "fulfilled"} to u, answer 201 {"id": r}

Deliveries are signed with Standard Webhooks (standardwebhooks.com) using SECRET.
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
from yarl import URL

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


def signed_request(url: URL, doc: dict[str, Any]) -> bytes:
    """One signed delivery of `doc` to `url` as the bytes of an HTTP/1.1 request."""
    body = json.dumps(doc).encode()
    head = [f"POST {url.raw_path_qs} HTTP/1.1", f"Host: {url.raw_host}:{url.port}"]
    head += [f"{name}: {value}" for name, value in signed(body).items()]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Connection(asyncio.Protocol):
    """One kept-alive connection: a request at a time, answered when its response is in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length :]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(0)


class RawSender:
    """`width` kept-alive connections to one host, each sending one request at a time, as a
    webhook sender's workers do; kept between batches, and made anew when one fails."""

    def __init__(self, url: str, width: int = 64) -> None:
        self.url = URL(url)
        self.width = width
        self.idle: list[_Connection] = []

    async def send_all(self, requests: list[bytes]) -> tuple[int, int]:
        """(delivered with a 2xx answer, failed)."""
        ok = failed = 0

        async def worker(mine: list[bytes]) -> None:
            nonlocal ok, failed
            conn: _Connection | None = self.idle.pop() if self.idle else None
            for request in mine:
                if conn is None or conn.transport is None:
                    conn = await self._connect()
                status = await conn.send(request)
                ok, failed = (ok + 1, failed) if 200 <= status < 300 else (ok, failed + 1)
            if conn is not None and conn.transport is not None:
                self.idle.append(conn)

        width = min(self.width, len(requests)) or 1
        await asyncio.gather(*(worker(requests[i::width]) for i in range(width)))
        return ok, failed

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = self.url.raw_host or "127.0.0.1", self.url.port or 80
        _, conn = await loop.create_connection(_Connection, host, port)
        return conn


def webhook_app() -> web.Application:
    app = web.Application()

    senders: dict[str, RawSender] = {}

    async def go(request: web.Request) -> web.Response:
        job = await request.json()
        sender = senders.get(job["url"])
        if sender is None:
            sender = senders[job["url"]] = RawSender(job["url"])
        requests = [signed_request(sender.url, {"ref": ref}) for ref in job["refs"]]
        sent, failed = await sender.send_all(requests)
        return web.json_response({"sent": sent, "failed": failed})

    app.router.add_post("/go", go)
    app.router.add_get("/ready", ready)
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
