"""`hopwatch demo`: the demo system and the monitor watching it, on loopback, until Ctrl-C."""

from __future__ import annotations

import tempfile
from pathlib import Path

from aiohttp import web
from rich.console import Console

from monitor.config import load
from monitor.demo.shop import build_shop_app
from monitor.engine import Engine, Options, split_hostport

FLOWS = Path(__file__).with_name("flows.yaml")


def demo_flows_file(shop_url: str, folder: Path) -> Path:
    """The bundled demo flows with the shop's address filled in."""
    path = folder / "demo-flows.yaml"
    path.write_text(FLOWS.read_text(encoding="utf-8").replace("SHOP_URL", shop_url), "utf-8")
    return path


async def start_site(app: web.Application, listen: str) -> web.AppRunner:
    host, port = split_hostport(listen)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def run_demo(
    *,
    listen: str,
    admin_listen: str,
    shop_listen: str,
    kafka: str | None,
    store: str | None,
    duration: float | None,
    console: Console,
) -> None:
    from monitor.cli import serve_until_signal

    shop_url = f"http://{shop_listen}"
    shop = await start_site(build_shop_app(), shop_listen)
    try:
        with tempfile.TemporaryDirectory(prefix="hopwatch-demo-") as tmp:
            config = load([demo_flows_file(shop_url, Path(tmp))])
            engine = Engine(
                config,
                Options(listen=listen, admin_listen=admin_listen, store_url=store),
            )
            await engine.start()
            console.print(
                "hopwatch demo running:\n"
                f"  shop API      {shop_url}   (faults: POST {shop_url}/faults)\n"
                f"  metrics       http://{admin_listen}/metrics\n"
                f"  status page   http://{admin_listen}/\n"
                f"  webhooks      http://{listen}/hooks/…\n"
                "Ctrl-C stops it."
            )
            await serve_until_signal(engine, duration)
    finally:
        await shop.cleanup()
