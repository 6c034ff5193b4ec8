"""A blackbox_exporter `grpc` module as one `grpc` step: the standard health check of its
`service`, over TLS when it says so."""

from __future__ import annotations

from typing import Any

from monitor.importers.blackbox_step import ModuleStep, ip_protocol, tls_settings
from monitor.importers.report import ImportResult
from probes import grpc as grpc_kind
from probes import tcp as tcp_kind

_HANDLED = {"service", "tls", "tls_config", "preferred_ip_protocol", "ip_protocol_fallback"}


def grpc_step(
    module: str, grpc: dict[str, Any], targets: list[str], result: ImportResult
) -> tuple[dict[str, Any], list[str]]:
    """The step for a module's `grpc` section, and its comment lines."""
    s = ModuleStep(module, grpc_kind.SPEC.name, {"target": "{{ variant.target }}"}, targets,
                   result)  # fmt: skip
    s.unknown_options(grpc, _HANDLED)
    s.check_targets("HOST:PORT", tcp_kind.split_address)
    if grpc.get("service"):
        s.step["service"] = str(grpc["service"])
    # blackbox reads tls_config only with tls: true (plaintext otherwise).
    if grpc.get("tls"):
        s.step["tls"] = tls_settings(s, grpc.get("tls_config") or {}, server_name=True,
                                     skip_verify=False)  # fmt: skip
    ip_protocol(s, grpc)
    return s.step, s.notes
