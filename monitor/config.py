"""Flow files: YAML validated by pydantic; every error says `file:line: flow 'x' step 'y': msg`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from monitor.cluster.settings import ClusterSettings
from monitor.config_errors import format_problems, nodes
from monitor.events.settings import EventsSettings
from monitor.kafka.settings import KafkaCluster
from monitor.maintenance.windows import MaintenanceSpec, unknown_names
from monitor.metrics_settings import MetricsSettings
from monitor.receivers.guard import BODY_TIMEOUT, HEADER_TIMEOUT
from probes import KINDS, StepConfig
from probes.durations import Duration
from probes.errors import ConfigError

_STEP_REF = re.compile(r"steps\.([A-Za-z_][A-Za-z0-9_]*)")


class Variant(BaseModel):
    """A named set of values a flow runs with: base URLs, headers, anything templates use."""

    model_config = ConfigDict(extra="allow", frozen=True)

    base_url: str | None = Field(default=None, description="Base URL; default none.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Headers added to this variant's requests; default none."
    )


class Incidents(BaseModel):
    """When a failing link reopens its recently closed incident instead of opening a new one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flap_window: Duration = Field(
        default=60.0,
        description="A failure this soon after the link's incident closed reopens it (counted "
        "as a flap) instead of opening a new incident; default 1m, so faults minutes apart are "
        "separate incidents; 0 never reopens.",
    )
    reopen: Literal["same_reason", "any_reason"] = Field(
        default="same_reason",
        description="Which failures within flap_window reopen: `same_reason` (default), only "
        "one with the reason the incident last failed with (another reason is another fault, "
        "a new incident), or `any_reason`.",
    )


class Flow(BaseModel):
    """A named chain of steps run as one synthetic transaction, on an interval, per variant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", description="Flow name, unique.")
    description: str = Field(default="", description="What the flow proves; default empty.")
    interval: Duration = Field(default=60.0, description="Time between runs; default 1m.")
    jitter: Duration | None = Field(
        default=None, description="Random spread added to each start; default 10% of interval."
    )
    timeout: Duration = Field(default=30.0, description="Limit for the whole run; default 30s.")
    location: str | None = Field(
        default=None, description="Location label; default the monitor's --location."
    )
    reuse_connections: bool = Field(
        default=False,
        description="Keep connections across runs (high rates); default false: fresh per run.",
    )
    cookies: bool = Field(
        default=False,
        description="Keep cookies between the steps of a run (login flows); default false.",
    )
    http_phases: bool | None = Field(
        default=None,
        description="Export this flow's HTTP phase histograms; default: settings.metrics.",
    )
    variants: dict[str, Variant] = Field(
        default_factory=lambda: {"default": Variant()},
        description='Named value sets; default one variant "default".',
    )
    steps: list[StepConfig] = Field(min_length=1, description="The hops, in order.")
    cleanup: list[StepConfig] = Field(
        default_factory=list, description="Steps that always run after the hops; never counted."
    )
    incidents: Incidents | None = Field(
        default=None,
        description="This flow's incident rules, replacing `settings.incidents` for it; "
        "default: those of settings.",
    )

    @field_validator("interval", "timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("variants")
    @classmethod
    def _some_variant(cls, value: dict[str, Variant]) -> dict[str, Variant]:
        if not value:
            raise ValueError("give at least one variant, or leave variants out")
        return value

    @property
    def spread(self) -> float:
        return self.jitter if self.jitter is not None else self.interval * 0.1

    def all_steps(self) -> list[Any]:
        return [*self.steps, *self.cleanup]


class Settings(BaseModel):
    """Monitor-wide settings; command-line flags override them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    location: str = Field(default="local", description="Location label; default local.")
    marker_header: str = Field(
        default="X-Hopwatch-Run",
        description="Header marking synthetic traffic (value: the run id); default X-Hopwatch-Run.",
    )
    events: EventsSettings | None = Field(
        default=None,
        description="Publish run results and incident changes as CloudEvents to a Kafka topic "
        "(`hopwatch run`); default: off.",
    )
    max_concurrency: int = Field(
        default=256, ge=1, description="Runs in flight at once, all flows; default 256."
    )
    incidents: Incidents = Field(
        default_factory=Incidents,
        description="Incident rules of every flow without its own; default flap_window 1m, "
        "reopen same_reason.",
    )
    cluster: ClusterSettings | None = Field(
        default=None,
        description="Share the flows with other replicas (`hopwatch run`); default: run alone.",
    )
    webhook_header_timeout: Duration = Field(
        default=HEADER_TIMEOUT,
        gt=0,
        description="Public listener: seconds for a whole request head, from connect or the "
        "last answer (also the keep-alive idle limit); default 10s.",
    )
    metrics: MetricsSettings = Field(
        default_factory=MetricsSettings,
        description="Optional series of /metrics; default: none of them, 15 latency buckets.",
    )
    webhook_body_timeout: Duration = Field(
        default=BODY_TIMEOUT,
        gt=0,
        description="Public listener: seconds for a whole webhook body after its head (408 "
        "after); default 30s.",
    )


class KafkaSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    clusters: dict[str, KafkaCluster] = Field(
        default_factory=dict, description="Kafka clusters by name; default none."
    )


class FileConfig(BaseModel):
    """One flow file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: Settings | None = Field(default=None, description="Monitor settings; default none.")
    kafka: KafkaSection | None = Field(default=None, description="Kafka clusters; default none.")
    flows: list[Flow] = Field(default_factory=list, description="The flows.")
    maintenance: list[MaintenanceSpec] = Field(
        default_factory=list,
        description="Maintenance windows: runs go on, marked, but open no incident; default none.",
    )


class Config(BaseModel):
    """Everything loaded from all flow files, merged."""

    model_config = ConfigDict(frozen=True)

    settings: Settings = Field(default_factory=Settings)
    kafka: KafkaSection = Field(default_factory=KafkaSection)
    flows: list[Flow] = Field(default_factory=list)
    maintenance: list[MaintenanceSpec] = Field(default_factory=list)
    sources: dict[str, str] = Field(default_factory=dict, description="flow name → file")

    def flow(self, name: str) -> Flow:
        for flow in self.flows:
            if flow.name == name:
                return flow
        raise KeyError(name)


_union_version = KINDS.version  # the registry's state the models' step union was built from


def follow_kinds() -> None:
    """Rebuild the models' step union after a kind registered since import (a kind from
    outside the tree), so its flows validate like any other."""
    global _union_version
    if _union_version == KINDS.version:
        return
    steps = cast(Any, list)[KINDS.union()]  # a type built at run time
    for name in ("steps", "cleanup"):
        Flow.model_fields[name].annotation = steps
    for model in (Flow, FileConfig, Config):
        model.model_rebuild(force=True)
    _union_version = KINDS.version


def load_file(path: Path) -> FileConfig:
    """Parse and validate one flow file; ConfigError lists every problem with its line."""
    follow_kinds()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    try:
        try:
            data = yaml.load(text, Loader=_FAST_LOADER)
        except yaml.YAMLError:
            data = yaml.safe_load(text)  # the pure-Python parser words its errors better
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{path}:{line}: YAML: {exc.problem or exc}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the file must be a mapping with a `flows:` list"])
    try:
        file = FileConfig.model_validate(data)
    except ValidationError as exc:
        errors = []
        for error in exc.errors(include_url=False):
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "union_tag_invalid":
                message = f"unknown kind {error['input'].get('kind')!r}; {_kinds_hint()}"
            errors.append((error["loc"], message))
        raise ConfigError(format_problems(path, nodes(text), data, errors)) from exc
    semantic = semantic_problems(file)
    if semantic:
        raise ConfigError(format_problems(path, nodes(text), data, semantic))
    return file


# libyaml's loader where installed: 10,000 flows load in about a second instead of ten.
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def semantic_problems(file: FileConfig) -> list[tuple[tuple[int | str, ...], str]]:
    """Rules across steps (unique names, references to earlier steps), with error locations."""
    problems: list[tuple[tuple[int | str, ...], str]] = _events_problems(file)
    for i, flow in enumerate(file.flows):
        problems.extend(_cluster_problems(file, i, flow))
        seen: set[str] = set()
        for group in ("steps", "cleanup"):
            for j, step in enumerate(getattr(flow, group)):
                loc = ("flows", i, group, j)
                if step.name in seen:
                    problems.append(((*loc, "name"), f"step name {step.name!r} is used twice"))
                for ref in _STEP_REF.findall(step.model_dump_json()):
                    known = seen if group == "steps" else {s.name for s in flow.all_steps()}
                    if ref not in known:
                        what = "an earlier step" if group == "steps" else "a step of this flow"
                        problems.append((loc, f"uses steps.{ref}, which is not {what}"))
                seen.add(step.name)
    return problems


def _cluster_problems(file: FileConfig, i: int, flow: Flow) -> list[tuple[tuple[Any, ...], str]]:
    """A Kafka step names a cluster of its own file (files are merged later, so look there)."""
    known = set(file.kafka.clusters) if file.kafka else set()
    problems: list[tuple[tuple[Any, ...], str]] = []
    for group in ("steps", "cleanup"):
        for j, step in enumerate(getattr(flow, group)):
            uses = KINDS[step.kind].cluster
            cluster = uses(step) if uses is not None else None
            if cluster is not None and cluster not in known:
                names = ", ".join(sorted(known)) or "none"
                problems.append(
                    (("flows", i, group, j, "cluster"),
                     f"unknown Kafka cluster {cluster!r} (kafka.clusters has: {names})")
                )  # fmt: skip
    return problems


def _events_problems(file: FileConfig) -> list[tuple[tuple[int | str, ...], str]]:
    """`settings.events` names a cluster of its own file, as Kafka steps do."""
    events = file.settings.events if file.settings is not None else None
    known = set(file.kafka.clusters) if file.kafka else set()
    if events is None or events.cluster in known:
        return []
    names = ", ".join(sorted(known)) or "none"
    loc = ("settings", "events", "cluster")
    return [(loc, f"unknown Kafka cluster {events.cluster!r} (kafka.clusters has: {names})")]


def _kinds_hint() -> str:
    return "known kinds: " + ", ".join(sorted(KINDS))


def unresolved_secrets(config: Config) -> list[str]:
    """Secret references that would fail at run time (unset variable, unreadable file),
    as `file:line: flow 'x' step 'y': message`, for `hopwatch validate`."""
    from probes.secrets import SECRET_REF, SecretUnavailable, resolve_secret

    problems: list[str] = []
    for flow in config.flows:
        source = Path(config.sources[flow.name])
        lines = source.read_text(encoding="utf-8").splitlines()
        for step in flow.all_steps():
            text = "\n".join(_strings(step))
            for match in SECRET_REF.finditer(text):
                try:
                    resolve_secret(match.group(0))
                except SecretUnavailable as exc:
                    line = _line_after(lines, [flow.name, step.name, match.group(0)])
                    problems.append(
                        f"{source}:{line}: flow {flow.name!r} step {step.name!r}: {exc}"
                    )
    return problems


def _line_after(lines: Sequence[str], needles: Sequence[str]) -> int:
    """The 1-based line of the last needle, each searched after the line of the one before."""
    at = 0
    for needle in needles:
        at = next((i for i in range(at, len(lines)) if needle in lines[i]), at)
    return at + 1


def _strings(value: Any) -> Iterable[str]:
    """Every string inside a config value, secret ones included (model dumps mask those)."""
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, str):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _strings(getattr(value, name))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders give their *.yaml and *.yml files, sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted([*path.glob("*.yaml"), *path.glob("*.yml")]))
        else:
            out.append(path)
    return out


def load(paths: Iterable[str | Path]) -> Config:
    """Load, validate and merge flow files; ConfigError carries every problem of every file."""
    problems: list[str] = []
    files: list[tuple[Path, FileConfig]] = []
    for path in expand_paths(paths):
        try:
            files.append((path, load_file(path)))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if not files and not problems:
        problems.append("no flow files given")
    settings: Settings | None = None
    clusters: dict[str, KafkaCluster] = {}
    flows: list[Flow] = []
    sources: dict[str, str] = {}
    maintenance: list[MaintenanceSpec] = []
    for path, file in files:
        maintenance.extend(file.maintenance)
        if file.settings is not None:
            if settings is not None and settings != file.settings:
                problems.append(f"{path}:1: settings differ from those in another file")
            settings = file.settings
        for name, cluster in (file.kafka.clusters if file.kafka else {}).items():
            if name in clusters and clusters[name] != cluster:
                problems.append(f"{path}:1: kafka cluster {name!r} is defined differently twice")
            clusters[name] = cluster
        for flow in file.flows:
            if flow.name in sources:
                problems.append(
                    f"{path}:1: flow {flow.name!r}: name already used in {sources[flow.name]}"
                )
                continue
            sources[flow.name] = str(path)
            flows.append(flow)
    for path, file in files:
        problems.extend(unknown_names(path, file.maintenance, flows))
    if problems:
        raise ConfigError(problems)
    return Config(
        settings=settings or Settings(),
        kafka=KafkaSection(clusters=clusters),
        flows=flows,
        maintenance=maintenance,
        sources=sources,
    )
