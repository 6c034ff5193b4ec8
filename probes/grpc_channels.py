"""The `grpc` kind's long-lived parts: one channel per target and TLS settings, and the message
types each server describes through reflection, learnt once.

The engine makes one `GrpcChannels` at start (`KindSpec.shared`) and closes it at stop.
Reflection is spoken here over the async channel (grpcio-reflection's own client blocks).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2

from probes.http_common import TlsConfig
from probes.tls_peek import LeafExpiries

_REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
_MAX_FILES = 200  # files one service's description may need (bounds a looping server)


class MethodNotFound(Exception):
    """The server does not describe the method (no reflection, or no such service/method)."""


@dataclass(frozen=True, slots=True)
class Method:
    """A unary method's path and message classes, as the server described them."""

    path: str
    request: Any  # the request's message class
    response: Any


def _read_file(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """gRPC's TLS credentials from hopwatch's TLS settings (gRPC always verifies)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read_file(tls.ca_file or ""),
        private_key=_read_file(tls.key_file or ""),
        certificate_chain=_read_file(tls.cert_file or ""),
    )


class GrpcChannels:
    """A channel per (target, TLS settings, server name), made on first use; the methods each
    target's reflection described; the servers' certificate expiries (`probes.tls_peek`)."""

    def __init__(self) -> None:
        self.expiries = LeafExpiries()
        self._channels: dict[tuple[str, TlsConfig | None, str | None], grpc.aio.Channel] = {}
        self._methods: dict[tuple[int, str], Method] = {}
        self._pools: dict[int, descriptor_pool.DescriptorPool] = {}

    def channel(
        self, target: str, tls: TlsConfig | None, server_name: str | None = None
    ) -> grpc.aio.Channel:
        key = (target, tls, server_name)
        channel = self._channels.get(key)
        if channel is None:
            if tls is None:
                channel = grpc.aio.insecure_channel(target)
            else:
                options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
                channel = grpc.aio.secure_channel(target, credentials(tls), options=options)
            self._channels[key] = channel
        return channel

    async def method(
        self, channel: grpc.aio.Channel, full_name: str, metadata: Any, timeout: float
    ) -> Method:
        """`package.Service/Method`'s types, asked of the server once per channel."""
        found = self._methods.get((id(channel), full_name))
        if found is not None:
            return found
        service, _, name = full_name.partition("/")
        pool = self._pools.setdefault(id(channel), descriptor_pool.DescriptorPool())
        try:
            descriptor = pool.FindServiceByName(service)
        except KeyError:
            await _learn(channel, pool, service, metadata, timeout)
            try:
                descriptor = pool.FindServiceByName(service)
            except KeyError:
                raise MethodNotFound(f"the server does not describe {service}") from None
        method: MethodDescriptor | None = descriptor.methods_by_name.get(name)
        if method is None:
            raise MethodNotFound(f"{service} has no method {name}")
        if method.client_streaming or method.server_streaming:
            raise MethodNotFound(f"{full_name} streams: only unary methods can be called")
        found = Method(
            f"/{service}/{name}",
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        )
        self._methods[(id(channel), full_name)] = found
        return found

    async def aclose(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._methods.clear()
        self._pools.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


async def _learn(
    channel: grpc.aio.Channel,
    pool: descriptor_pool.DescriptorPool,
    symbol: str,
    metadata: Any,
    timeout: float,
) -> None:
    """Add the files defining `symbol`, and the files they import, to `pool` (reflection)."""
    call = channel.stream_stream(
        _REFLECTION,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    stream = call(metadata=metadata, timeout=timeout)
    await stream.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    asked: set[str] = set()
    pending = 1  # one answer per request
    while pending:
        read = await stream.read()
        if read is grpc.aio.EOF:
            break
        response = cast(reflection_pb2.ServerReflectionResponse, read)
        pending -= 1
        if response.HasField("error_response"):
            raise MethodNotFound(
                f"reflection: {response.error_response.error_message or 'no such symbol'}"
            )
        for raw in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files.setdefault(proto.name, proto)
        missing = {d for f in files.values() for d in f.dependency} - files.keys() - asked
        for name in sorted(missing):
            if len(asked) >= _MAX_FILES:
                raise MethodNotFound(f"reflection: {symbol} needs over {_MAX_FILES} files")
            if not _known(pool, name):
                asked.add(name)
                pending += 1
                await stream.write(reflection_pb2.ServerReflectionRequest(file_by_filename=name))
    await stream.done_writing()
    added: set[str] = set()

    def add(name: str) -> None:  # dependencies first, as the pool requires
        if name in added or _known(pool, name):
            return
        added.add(name)
        for dependency in files[name].dependency:
            if dependency in files:
                add(dependency)
        pool.Add(files[name])

    for name in files:
        add(name)


def _known(pool: descriptor_pool.DescriptorPool, file_name: str) -> bool:
    try:
        pool.FindFileByName(file_name)
    except KeyError:
        return False
    return True
