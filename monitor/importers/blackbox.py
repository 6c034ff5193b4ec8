"""`hopwatch import blackbox`: blackbox_exporter modules, with the targets of the Prometheus
scrape jobs that use them, as flows — one per (job, module), one variant per target, the
job's scrape interval as the flow's interval.

A module becomes one step of the kind of the same name as its prober (http, tcp, dns, grpc;
each translated by its own module); `icmp` and other probers are listed as not supported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monitor.importers.blackbox_dns import dns_step
from monitor.importers.blackbox_grpc import grpc_step
from monitor.importers.blackbox_http import http_step
from monitor.importers.blackbox_step import PLACEHOLDER
from monitor.importers.blackbox_tcp import tcp_step
from monitor.importers.report import FlowOut, ImportError_, ImportResult, safe_name
from probes import dns as dns_kind
from probes import grpc as grpc_kind
from probes import http as http_kind
from probes import tcp as tcp_kind
from probes.durations import format_duration

_PROMETHEUS_INTERVAL = "1m"  # Prometheus' defaults when the file says nothing
_PROMETHEUS_TIMEOUT = "10s"
_DEFAULT_MODULE = "http_2xx"  # what blackbox_exporter probes when `module` is not given
_TARGET_SOURCES = ("file_sd_configs", "kubernetes_sd_configs", "consul_sd_configs",
                   "dns_sd_configs", "http_sd_configs", "ec2_sd_configs")  # fmt: skip


Translate = Callable[
    [str, dict[str, Any], list[str], ImportResult], tuple[dict[str, Any], list[str]] | None
]


@dataclass(frozen=True, slots=True)
class Prober:
    """How a blackbox prober becomes a step: its translator, and a scrape target as the
    variant's `target` (the placeholder's value when no job names one)."""

    translate: Translate
    target: Callable[[str], str]
    placeholder: str


def _as_url(target: str) -> str:
    """A target as blackbox_exporter's http prober reads it: http:// when no scheme is given."""
    return target if "://" in target else "http://" + target


# blackbox's probers are named as hopwatch's kinds: a module's section has the prober's name.
PROBERS: dict[str, Prober] = {
    http_kind.SPEC.name: Prober(http_step, _as_url, _as_url(PLACEHOLDER)),
    tcp_kind.SPEC.name: Prober(tcp_step, str, f"{PLACEHOLDER}:PORT"),
    dns_kind.SPEC.name: Prober(dns_step, str, PLACEHOLDER),
    grpc_kind.SPEC.name: Prober(grpc_step, str, f"{PLACEHOLDER}:PORT"),
}


@dataclass(slots=True)
class Job:
    """A scrape job that calls the exporter: its module, targets and timing."""

    name: str
    module: str
    targets: list[str]
    interval: str
    timeout: str


def import_blackbox(config: Any, prometheus: Any = None, *, source: str = "") -> ImportResult:
    """Translate a parsed blackbox configuration (and Prometheus configuration) into flows."""
    if not isinstance(config, dict) or not isinstance(config.get("modules"), dict):
        raise ImportError_("not a blackbox_exporter configuration: no `modules` mapping")
    modules: dict[str, Any] = config["modules"]
    result = ImportResult(source=source or "blackbox.yml")
    jobs = _jobs(prometheus, result) if prometheus is not None else None
    taken: set[str] = set()
    for name, module in modules.items():
        if not isinstance(module, dict):
            result.leave_out(f"module '{name}'", "not a mapping")
            continue
        prober = str(module.get("prober", ""))
        if prober not in PROBERS:
            result.leave_out(f"module '{name}'", f"prober {prober or '(none)'} is not supported: "
                             "no flow made")  # fmt: skip
            continue
        if jobs is None:
            placeholder = Job(name, name, [], _PROMETHEUS_INTERVAL, _PROMETHEUS_TIMEOUT)
            result.leave_out(
                f"module '{name}'",
                "no targets without --prometheus: the flow probes the placeholder variant "
                "'example', set its target",
            )
            _add(result, _flow(placeholder, name, module, result, taken, one=True))
            continue
        users = [j for j in jobs if j.module == name]
        if not users:
            result.leave_out(f"module '{name}'", "no scrape job uses it: no flow made")
        for job in users:
            one = sum(1 for j in jobs if j.name == job.name) == 1
            _add(result, _flow(job, name, module, result, taken, one=one))
    if jobs is not None:
        for job in jobs:
            if job.module not in modules:
                result.leave_out(f"job '{job.name}'", f"uses module {job.module!r}, which the "
                                 "blackbox configuration does not define")  # fmt: skip
    if not result.flows:
        result.notes.append("No module could be translated into a flow.")
    return result


def _add(result: ImportResult, flow: FlowOut | None) -> None:
    if flow is not None:
        result.flows.append(flow)


def _flow(
    job: Job, module_name: str, module: dict[str, Any], result: ImportResult, taken: set[str],
    *, one: bool,
) -> FlowOut | None:  # fmt: skip
    """The flow probing `job`'s targets with the module; None when the module cannot become a
    step (what stopped it is listed)."""
    prober = PROBERS[str(module["prober"])]
    targets = job.targets or [PLACEHOLDER]
    section = module.get(str(module["prober"])) or {}
    if not isinstance(section, dict):
        result.leave_out(f"module '{module_name}'", f"its {module['prober']} section is not a "
                         "mapping: no flow made")  # fmt: skip
        return None
    made = prober.translate(module_name, section, targets, result)
    if made is None:
        return None
    step, notes = made
    name = job.name if one else f"{job.name}_{module_name}"
    flow = FlowOut(fields={"name": safe_name(name, taken, "probe")})
    scraped = job.name != module_name or job.targets
    flow.comment.append(
        f"blackbox module {module_name!r}" + (f", scrape job {job.name!r}" if scraped else "")
    )
    flow.fields["interval"] = _duration(job.interval)
    flow.fields["timeout"] = _duration(module.get("timeout") or job.timeout)
    flow.fields["variants"] = {
        ("example" if t == PLACEHOLDER else t): {
            "target": prober.placeholder if t == PLACEHOLDER else prober.target(t)
        }
        for t in targets
    }
    flow.steps.append(step)
    flow.notes[step["name"]] = notes
    return flow


_PROM_UNITS = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_PROM_DURATION = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")


def _duration(value: Any) -> str:
    """A Prometheus duration (`1m30s`) as a flow duration; as written if it does not parse
    (then the file fails `hopwatch validate` with the field named)."""
    text = str(value).strip()
    parts = _PROM_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return text
    return format_duration(sum(int(n) * _PROM_UNITS[u] for n, u in parts))


def _jobs(prometheus: Any, result: ImportResult) -> list[Job]:
    if not isinstance(prometheus, dict):
        raise ImportError_("the Prometheus configuration is not a mapping")
    glob = prometheus.get("global") or {}
    interval = str(glob.get("scrape_interval") or _PROMETHEUS_INTERVAL)
    timeout = str(glob.get("scrape_timeout") or _PROMETHEUS_TIMEOUT)
    jobs = []
    for scrape in prometheus.get("scrape_configs") or []:
        params = scrape.get("params") or {}
        if scrape.get("metrics_path") != "/probe" and "module" not in params:
            continue  # not a job that calls the exporter
        name = str(scrape.get("job_name", "probe"))
        targets = [
            str(t)
            for static in scrape.get("static_configs") or []
            for t in static.get("targets", [])
        ]
        for key in _TARGET_SOURCES:
            if scrape.get(key):
                result.leave_out(f"job '{name}'", f"targets from {key} are not read; "
                                 "list them in static_configs or add variants by hand")  # fmt: skip
        for module in params.get("module") or [_DEFAULT_MODULE]:
            jobs.append(Job(name, str(module), targets,
                            str(scrape.get("scrape_interval") or interval),
                            str(scrape.get("scrape_timeout") or timeout)))  # fmt: skip
    return jobs
