"""The demo's outgoing webhooks: signed with Standard Webhooks, retried on failure, with faults.

Faults (in `Faults.extra`, switched at runtime through the shop's /faults):
`webhook_drop` (never sent), `webhook_delay_ms` (sent late), `webhook_bad_signature` (forged),
`webhook_duplicate` (delivered twice with the same webhook-id), `webhook_retry_first` (the first
attempt is lost to a 5xx; the sender retries after a backoff, as real senders do).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from monitor.demo.shop import Faults

log = logging.getLogger(__name__)

DEMO_SECRET = "whsec_" + base64.b64encode(b"hopwatch-demo-webhook-secret-32b").decode()
RETRY_BACKOFF = 0.5


def sign_standard_webhook(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: v1,base64(HMAC-SHA256(key, "id.ts.body"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class WebhookSender:
    """Posts events to one subscriber URL; never blocks the caller (deliveries run as tasks)."""

    def __init__(
        self,
        url: str,
        faults: Faults,
        secret: str = DEMO_SECRET,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        self.url = url
        self.faults = faults
        self.secret = secret
        self.trace_configs = list(trace_configs)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0

    def send(self, event: dict[str, Any], url: str | None = None) -> None:
        """Deliver `event` to `url` (a per-order callback URL) or the default subscriber."""
        # The task copies the current context: each attempt's span is a child of the caller's.
        task = asyncio.create_task(self._deliver(event, {}, url or self.url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event: dict[str, Any], extra: dict[str, str], url: str) -> None:
        f = self.faults.extra
        if f.get("webhook_drop"):
            return
        if f.get("webhook_delay_ms"):
            await asyncio.sleep(float(f["webhook_delay_ms"]) / 1000)
        body = json.dumps(event).encode()
        msg_id = "msg_" + secrets.token_hex(12)
        timestamp = int(time.time())
        signature = sign_standard_webhook(self.secret, msg_id, timestamp, body)
        if f.get("webhook_bad_signature"):
            signature = "v1," + base64.b64encode(secrets.token_bytes(32)).decode()
        headers = {
            **extra,
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        if f.get("webhook_retry_first"):
            await asyncio.sleep(RETRY_BACKOFF)  # the first attempt got a 5xx from a gateway
        copies = 2 if f.get("webhook_duplicate") else 1
        for _ in range(copies):
            await self._post_with_retries(url, body, headers)

    async def _post_with_retries(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=5), trace_configs=self.trace_configs
            )
        for attempt in range(3):
            try:
                async with self._session.post(url, data=body, headers=headers) as resp:
                    if resp.status < 500:
                        self.sent += 1
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("webhook to %s failed: %s", url, exc)
            await asyncio.sleep(RETRY_BACKOFF * (attempt + 1))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
