"""The certificate peek of kinds whose client hides the peer certificate (grpc): against a real
TLS server on loopback, with a client certificate, once per target however many runs ask."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from probes.errors import ConnectError, Timeout, TlsError
from probes.http_common import TlsConfig
from probes.tls_peek import LeafExpiries
from tests.fixtures.core import free_port
from tests.fixtures.tls import ShortCert


@pytest.fixture
async def mtls_port(short_cert: ShortCert) -> AsyncIterator[int]:
    """A TLS 1.2 server wanting a client certificate of the CA (1.2: a refusal is part of the
    handshake, as it is not in 1.3)."""
    context = short_cert.server
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(short_cert.ca_file))

    async def hello(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_the_client_certificate_is_presented(
    mtls_port: int, short_cert: ShortCert, tmp_path: Path
) -> None:
    client = short_cert.ca.issue_cert("hopwatch@example.test")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    ca = str(short_cert.ca_file)
    with_cert = TlsConfig(ca_file=ca, cert_file=str(cert_file), key_file=str(key_file))
    expiries = LeafExpiries()
    got = await expiries.not_after("127.0.0.1", mtls_port, with_cert, "localhost", 5.0)
    assert got == short_cert.not_after.timestamp()
    with pytest.raises(TlsError, match=r"^TLS to 127.0.0.1:\d+: "):
        await expiries.not_after("127.0.0.1", mtls_port, TlsConfig(ca_file=ca), "localhost", 5.0)


async def test_concurrent_runs_share_one_handshake_and_the_ttl_bounds_its_age(
    mtls_port: int, short_cert: ShortCert, tmp_path: Path
) -> None:
    client = short_cert.ca.issue_cert("hopwatch@example.test")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    tls = TlsConfig(ca_file=str(short_cert.ca_file), cert_file=str(tmp_path / "c.pem"),
                    key_file=str(tmp_path / "c.key"))  # fmt: skip
    now = 1000.0
    expiries = LeafExpiries(ttl=60, clock=lambda: now)
    got = await asyncio.gather(
        *(expiries.not_after("127.0.0.1", mtls_port, tls, "localhost", 5.0) for _ in range(20))
    )
    assert set(got) == {short_cert.not_after.timestamp()} and expiries.handshakes == 1
    now += 59
    await expiries.not_after("127.0.0.1", mtls_port, tls, "localhost", 5.0)
    assert expiries.handshakes == 1
    now += 2
    await expiries.not_after("127.0.0.1", mtls_port, tls, "localhost", 5.0)
    assert expiries.handshakes == 2


async def test_a_wrong_name_or_nothing_listening_is_said_and_not_cached(
    mtls_port: int, short_cert: ShortCert
) -> None:
    expiries = LeafExpiries()
    tls = TlsConfig(ca_file=str(short_cert.ca_file))
    with pytest.raises(TlsError, match=r"Hostname mismatch|doesn't match"):
        await expiries.not_after("127.0.0.1", mtls_port, tls, "elsewhere.test", 5.0)
    port = free_port()
    for _ in range(2):
        with pytest.raises(ConnectError, match=f"cannot connect to 127.0.0.1:{port}: "):
            await expiries.not_after("127.0.0.1", port, tls, "127.0.0.1", 5.0)
    assert expiries.handshakes == 3


async def test_a_server_that_never_answers_the_handshake_times_out_in_the_time_given() -> None:
    """The kind gives the check only the step's time left, so a silent server costs the step
    its certificate figure, not its verdict."""
    accepted = asyncio.Event()

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        expiries = LeafExpiries()
        started = asyncio.get_running_loop().time()
        with pytest.raises(Timeout, match=f"^no TLS handshake with 127.0.0.1:{port} in time$"):
            await expiries.not_after("127.0.0.1", port, TlsConfig(), "127.0.0.1", 0.3)
        took = asyncio.get_running_loop().time() - started
    assert accepted.is_set() and 0.3 <= took < 2.0
