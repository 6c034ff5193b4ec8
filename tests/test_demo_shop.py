"""The demo shop's `hang` fault holds requests until it is cleared or the shop stops: a request
its client gave up on must not outlive the fault, nor hold the shop's shutdown for a minute
(the soak's demo took longer than 30 s to stop after a hang)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from monitor.demo.broker import free_port
from monitor.demo.shop import Faults, build_shop_app
from monitor.engine import serve_app


async def test_a_hung_request_is_released_when_the_fault_is_cleared() -> None:
    addr = f"127.0.0.1:{free_port()}"
    runner = await serve_app(build_shop_app(Faults(hang=True, paths=["/orders"])), addr)
    try:
        async with aiohttp.ClientSession() as http:
            hung = asyncio.ensure_future(http.get(f"http://{addr}/orders/nope"))
            done, _ = await asyncio.wait([hung], timeout=0.5)
            assert not done, "the hang fault did not hold the request"
            async with http.delete(f"http://{addr}/faults") as cleared:
                assert cleared.status == 200
            async with asyncio.timeout(5):
                response = await hung
            assert response.status == 404  # on to the handler once the fault is gone
            response.release()
    finally:
        await runner.cleanup()


async def test_the_shop_stops_at_once_with_a_request_hanging() -> None:
    addr = f"127.0.0.1:{free_port()}"
    runner = await serve_app(build_shop_app(Faults(hang=True)), addr)
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            async with http.get(f"http://{addr}/orders/nope"):
                raise AssertionError("the hang fault did not hold the request")
        except TimeoutError:
            pass  # the client gave up, as hopwatch does at its deadline
    began = time.monotonic()
    async with asyncio.timeout(10):
        await runner.cleanup()
    assert time.monotonic() - began < 2  # was aiohttp's 60 s shutdown timeout


async def test_a_request_given_up_during_a_hang_is_dropped_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The soak's demo log had an ERROR traceback (ConnectionResetError reading the body) for
    every order hopwatch gave up on while the API hung: the shop read a gone client's body."""
    addr = f"127.0.0.1:{free_port()}"
    faults = Faults(hang=True, paths=["/orders"])
    runner = await serve_app(build_shop_app(faults), addr)
    try:
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            with pytest.raises(TimeoutError):
                async with http.post(
                    f"http://{addr}/orders", json={"sku": "x"} | {"pad": "p" * 99999}
                ):
                    pass
        async with aiohttp.ClientSession() as http, http.delete(f"http://{addr}/faults") as cleared:
            assert cleared.status == 200
    finally:
        await runner.cleanup()  # waits for the released handler
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
