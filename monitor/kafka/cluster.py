"""Per cluster, what its producers and its shared consumer share: client options, TLS, health."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.helpers import create_ssl_context

from monitor.kafka.errors import describe
from monitor.kafka.settings import KafkaCluster
from probes.errors import ConfigError
from probes.secrets import SecretUnavailable, resolve_secret

__all__ = ["Cluster", "ClusterHealth", "ConsumerState", "stop_quietly"]

log = logging.getLogger(__name__)

ConsumerState = Literal["off", "starting", "up", "down"]

_CLOSE_BUDGET_S = 5.0


@dataclass(slots=True)
class ClusterHealth:
    """What the monitor knows about one cluster right now."""

    cluster: str
    topics: tuple[str, ...]
    consumer: ConsumerState = "off"
    producer: Literal["idle", "up", "down"] = "idle"
    last_error: str | None = None
    last_error_unix: float | None = None
    last_record_unix: float | None = None
    consumer_restarts: int = 0
    log_resets: int = 0  # partitions whose log went backwards (a broker that lost its data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "topics": list(self.topics),
            "consumer": self.consumer,
            "producer": self.producer,
            "last_error": self.last_error,
            "last_error_unix": self.last_error_unix,
            "last_record_unix": self.last_record_unix,
            "consumer_restarts": self.consumer_restarts,
            "log_resets": self.log_resets,
        }


@dataclass
class Cluster:
    """One configured cluster: its settings, its health, and the TLS context made once."""

    name: str
    config: KafkaCluster
    health: ClusterHealth
    ssl_context: ssl.SSLContext | None = field(default=None, init=False)

    def tls(self) -> ssl.SSLContext | None:
        """The TLS context (None without TLS); a bad key or secret is a ConfigError."""
        if self.ssl_context is None:
            self.ssl_context = _ssl_context(self.name, self.config)
        return self.ssl_context

    def client_options(self) -> dict[str, Any]:
        """aiokafka keyword arguments shared by producers and consumers, secrets resolved now,
        so a rotated secret is picked up by the next client made."""
        config = self.config
        options: dict[str, Any] = {
            "bootstrap_servers": config.servers,
            "client_id": config.client_id,
            "security_protocol": config.security_protocol,
            "request_timeout_ms": int(config.request_timeout * 1000),
            "ssl_context": self.tls(),
        }
        if config.sasl_mechanism is not None:
            try:
                options["sasl_mechanism"] = config.sasl_mechanism
                options["sasl_plain_username"] = resolve_secret(config.sasl_username or "")
                options["sasl_plain_password"] = resolve_secret(config.sasl_password or "")
            except SecretUnavailable as exc:
                raise ConfigError([f"kafka cluster {self.name!r}: {exc}"]) from exc
        return options

    def failed(self, exc: BaseException) -> None:
        self.health.last_error = describe(exc)
        self.health.last_error_unix = time.time()


def _ssl_context(name: str, cluster: KafkaCluster) -> ssl.SSLContext | None:
    if cluster.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        password = resolve_secret(cluster.ssl_password) if cluster.ssl_password else None
        context: ssl.SSLContext = create_ssl_context(
            cafile=cluster.ssl_cafile,
            certfile=cluster.ssl_certfile,
            keyfile=cluster.ssl_keyfile,
            password=password,
        )
    except (SecretUnavailable, OSError) as exc:
        raise ConfigError([f"kafka cluster {name!r} TLS settings: {exc}"]) from exc
    context.check_hostname = cluster.ssl_check_hostname
    return context


async def stop_quietly(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Stop an aiokafka client within a bounded time, whatever state it is in."""
    try:
        async with asyncio.timeout(_CLOSE_BUDGET_S):
            await client.stop()
    except Exception as exc:
        log.debug("stopping %s: %s", type(client).__name__, exc)
