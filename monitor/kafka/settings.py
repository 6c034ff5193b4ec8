"""How to reach each Kafka cluster (`kafka.clusters`); free of aiokafka so validating loads none."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from probes.durations import Duration

__all__ = ["KafkaCluster"]


class KafkaCluster(BaseModel):
    """How to reach one Kafka cluster; secrets may be `${env:NAME}` or `${file:/path}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str | list[str] = Field(
        description='"host:port", comma-separated or a list; required, no default.'
    )
    client_id: str = Field(default="hopwatch", description="Kafka client id; default hopwatch.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="Transport and authentication; default PLAINTEXT."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism, required with SASL_*; default none."
    )
    sasl_username: str | None = Field(
        default=None, description="SASL user (may be a ${env:…} reference); default none."
    )
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password, best as ${env:…} or ${file:…}; default none."
    )
    ssl_cafile: str | None = Field(
        default=None, description="CA bundle to verify brokers; default the system's."
    )
    ssl_certfile: str | None = Field(
        default=None, description="Client certificate (mutual TLS); default none."
    )
    ssl_keyfile: str | None = Field(
        default=None, description="Client private key (mutual TLS); default none."
    )
    ssl_password: SecretStr | None = Field(
        default=None, description="Password of the client key; default none."
    )
    ssl_check_hostname: bool = Field(
        default=True, description="Check the broker's certificate name; default true."
    )
    request_timeout: Duration = Field(
        default=10.0, description="Limit for one request, and for a send to be acked; default 10s."
    )
    fetch_max_wait: Duration = Field(
        default=0.1,
        description="Longest the broker holds a fetch open; bounds observe latency; default 100ms.",
    )
    health_interval: Duration = Field(
        default=2.0,
        description="How often the shared consumer checks the broker and its offsets; default 2s.",
    )

    @field_validator("request_timeout", "fetch_max_wait", "health_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @model_validator(mode="after")
    def _consistent_security(self) -> KafkaCluster:
        sasl = self.security_protocol.startswith("SASL_")
        given_sasl = [
            n for n in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, n)
        ]
        if sasl and len(given_sasl) < 3:
            raise ValueError(
                f"{self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
            )
        if not sasl and given_sasl:
            raise ValueError(f"{', '.join(given_sasl)} need security_protocol SASL_*")
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        given_ssl = [
            n
            for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password")
            if getattr(self, n) is not None
        ]
        if not tls and given_ssl:
            raise ValueError(f"{', '.join(given_ssl)} need security_protocol SSL or SASL_SSL")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("give ssl_certfile and ssl_keyfile together")
        return self

    @property
    def servers(self) -> list[str]:
        raw = self.bootstrap_servers
        parts = raw.split(",") if isinstance(raw, str) else raw
        return [p.strip() for p in parts if p.strip()]
