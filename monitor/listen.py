"""Listening addresses: HOST:PORT parsed once, and an aiohttp app served on one."""

from __future__ import annotations

from aiohttp import web


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"want HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def serve_app(app: web.Application, listen: str) -> web.AppRunner:
    """Serve `app` on HOST:PORT; the caller cleans the returned runner up."""
    host, port = split_hostport(listen)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
