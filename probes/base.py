"""The one small interface between engine and probe kind: context in, outcome or StepFailed out.

The engine (`monitor/`) owns long-lived resources and lends them through `StepContext`;
a probe never opens or closes a session, never exports a metric and never owns time:
the runner puts `asyncio.timeout` around each step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from probes.arrivals import Arrival, CorrelatorPort
from probes.durations import Duration
from probes.kafka_port import KafkaPort

if TYPE_CHECKING:
    import aiohttp

    from probes.http_common import PhaseTimer, Response

RenderMode = Literal["text", "url", "header"]
SharedT = TypeVar("SharedT")
ARRIVAL_KEY = "trace_arrival"
_VARIABLES = "_template_variables"


class RunValues(dict[str, Any]):
    """`run.*` for templates. The unique values a request may need (Postman's `{{$guid}}`,
    `{{$timestamp}}`): `guid`, `timestamp`, `iso_timestamp`, made when a template first asks
    for one (4 µs a run otherwise spent for nothing), and the same for the rest of the run."""

    _LAZY = frozenset({"guid", "timestamp", "iso_timestamp"})

    def __contains__(self, key: object) -> bool:
        return key in self._LAZY or super().__contains__(key)

    def __missing__(self, key: str) -> Any:
        if key not in self._LAZY:
            raise KeyError(key)
        now = time.time()
        self["guid"] = str(uuid.uuid5(uuid.NAMESPACE_OID, str(self["id"])))
        self["timestamp"] = int(now)
        self["iso_timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return self[key]


class Untrusted(str):
    """A value taken from a response: URL-encoded in URLs, refused in headers with CR/LF."""

    __slots__ = ()


class StepConfigBase(BaseModel):
    """Fields every step kind has; a kind's `Config` adds its own and `kind: Literal[...]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        description="Step name, unique within the flow; the link is named (flow, step).",
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
    )
    timeout: Duration | None = Field(
        default=None,
        description="Per-step time limit, e.g. 5s; default: the rest of the run's timeout.",
    )


@dataclass(slots=True)
class RunInfo:
    """Identity of the run a step belongs to."""

    id: str
    correlation: str
    flow: str
    variant: str
    location: str


@dataclass(slots=True)
class StepOutcome:
    """A passed step: its latency as the kind defines it, and what it extracted for later steps."""

    latency_s: float | None = None
    vars: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    tls_not_after: float | None = None  # the server's leaf certificate's expiry, unix seconds
    # the part of latency_s that is this hop's own, when latency_s also covers earlier steps
    # (a waiting kind timed from its trigger's start): from the previous step's end
    own_latency_s: float | None = None


class Renderer(Protocol):
    """Template rendering (Jinja2 sandbox) supplied by the engine."""

    def render(self, template: str, variables: Mapping[str, Any], mode: RenderMode) -> str: ...

    def redact(self, text: str) -> str:
        """`text` with the secrets rendering resolved masked (for spans and messages)."""
        ...


class Shared(Protocol):
    """A kind's long-lived resources (pools, channels): made by the engine at start, closed at
    stop, lent to every run as `StepContext.shared[<kind>]`. One that also has a `readings()`
    method returning `Reading`s has them shown on /metrics at every scrape."""

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Reading:
    """A figure a kind's shared resources report on /metrics (a browser's memory): the kind
    names its own series, `hopwatch_<kind>_…`, so the engine never has to."""

    name: str
    help: str
    value: float
    type: Literal["gauge", "counter"] = "gauge"


class HttpClients(Protocol):
    """HTTP sessions lent by the engine: fresh per run unless the flow reuses connections."""

    def session_for(self, ctx: StepContext, tls: Any) -> aiohttp.ClientSession: ...

    def wire_for(self, ctx: StepContext, tls: Any) -> WireClient | None:
        """The wire client for this run's requests, or None where they need aiohttp's
        session (per-run cookies)."""
        ...


class WireClient(Protocol):
    """probes.http_wire.WirePool as the http kinds call it."""

    async def send(
        self,
        timer: PhaseTimer,
        method: str,
        url: str,
        headers: Mapping[str, str],
        params: dict[str, str] | None,
        data: bytes | None,
    ) -> Response | None: ...


@dataclass(slots=True)
class StepContext:
    """What a probe may use. Built by the runner once per run; `step` changes per step."""

    run: RunInfo
    variant: Mapping[str, Any]
    steps: dict[str, dict[str, Any]]
    renderer: Renderer
    http: HttpClients
    marker_header: str
    public_url: str
    deadline: float  # monotonic seconds; the run's end
    reuse_connections: bool = False
    one_request: bool = False  # the run sends one HTTP request in all (KindSpec.one_request)
    cookies: bool = False  # keep cookies between this run's steps
    correlator: CorrelatorPort | None = None  # None: the engine lent none (waiting kinds refuse)
    kafka: KafkaPort | None = None  # None: no kafka clusters configured (Kafka kinds refuse)
    propagation: Callable[[], dict[str, str]] = dict
    shared: Mapping[str, Shared] = field(default_factory=dict)  # by kind name (KindSpec.shared)
    step_started: dict[str, float] = field(default_factory=dict)  # monotonic, by step name
    step_ended: dict[str, float] = field(default_factory=dict)  # monotonic, by step name
    run_state: dict[Any, Any] = field(default_factory=dict)  # per-run scratch, e.g. sessions
    step: str = ""

    def variables(self) -> dict[str, Any]:
        """The names templates see: run, variant, steps, public_url. Built once per run: its
        parts are references, and `steps` fills in as the run goes."""
        cached = self.run_state.get(_VARIABLES)
        if cached is None:
            run = self.run
            cached = self.run_state[_VARIABLES] = {
                "run": RunValues(
                    id=run.id,
                    correlation=run.correlation,
                    flow=run.flow,
                    variant=run.variant,
                    location=run.location,
                ),
                "variant": {"name": run.variant, **self.variant},
                "steps": self.steps,
                "public_url": self.public_url,
            }
        return cached

    def render(self, template: str, mode: RenderMode = "text") -> str:
        variables = self.run_state.get(_VARIABLES)  # `variables()`'s cache, without its call
        if variables is None:
            variables = self.variables()
        return self.renderer.render(template, variables, mode)

    def render_value(self, value: Any) -> Any:
        """Render every string inside a JSON-like value (dicts, lists, scalars)."""
        if isinstance(value, str):
            return self.render(value)
        if isinstance(value, dict):
            return {self.render(str(k)): self.render_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render_value(v) for v in value]
        return value

    def outgoing_headers(self) -> dict[str, str]:
        """Headers every outgoing request and record carries: the synthetic-traffic marker
        and the trace context."""
        headers = {self.marker_header: self.run.id}
        headers.update(self.propagation())
        return headers

    def note_arrival(self, arrival: Arrival) -> None:
        """Tell the engine which arrival this step took (its span links to the sender's)."""
        self.run_state[(ARRIVAL_KEY, self.step)] = arrival

    def lent(self, kind: str, shape: type[SharedT]) -> SharedT:
        """The shared resources of `kind` the engine lent; an internal error when it lent none
        (a context built without the engine)."""
        found = self.shared.get(kind)
        if not isinstance(found, shape):
            raise RuntimeError(f"the engine lent no {shape.__name__} for {kind} steps")
        return found

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


ConfigT_contra = TypeVar("ConfigT_contra", bound=StepConfigBase, contravariant=True)


class Probe(Protocol[ConfigT_contra]):
    """One step kind: execute the step, return an outcome or raise StepFailed."""

    async def run(self, config: ConfigT_contra, ctx: StepContext) -> StepOutcome: ...
