"""What a step kind is to the engine: one `KindSpec` per kind, and the registry that lists them.

A kind describes itself here (its config model, its probe, the failures it can report, its
span, what it listens to or waits for), so the engine asks the kind instead of spelling its
name. Kinds come from `probes/__init__.py`, from installed packages through the
`hopwatch.kinds` entry point group, or from `KINDS.register` (a kind living outside the tree).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any, Final, Generic, Literal, TypeVar, Union, get_args

from pydantic import Field

from probes.base import Probe, Shared, StepConfigBase, StepContext
from probes.errors import FAILURES, OtherFailure, StepFailed, Timeout

if TYPE_CHECKING:
    from probes.http_common import TlsConfig
    from probes.signatures import SignatureConfig

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hopwatch.kinds"
SpanKindName = Literal["client", "producer", "consumer", "internal"]
ConfigT = TypeVar("ConfigT", bound=StepConfigBase)
T = TypeVar("T")
# The runner gives these to any step: its time limit ran out, or a template or our code failed.
_RUNNER_REASONS: Final = (Timeout.reason, OtherFailure.reason)


@dataclass(frozen=True, slots=True)
class SpanShape:
    """A step span's name, OpenTelemetry span kind and starting attributes."""

    name: str
    kind: SpanKindName
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WebhookRoute:
    """A path the public listener serves for a step that waits for webhooks: its signature
    and its answer."""

    path: str
    signature: SignatureConfig | None = None
    respond_status: int = 202
    respond_body: str | dict[str, Any] | list[Any] | None = None
    step: str = ""  # for messages only


@dataclass(frozen=True, slots=True)
class KindSpec(Generic[ConfigT]):
    """One step kind. Only `config` and `probe` are required; the rest says what the engine
    must prepare for it. Its name is the `kind: Literal[...]` of its config model."""

    config: type[ConfigT]
    probe: Probe[ConfigT]
    # The failures it can report, each with its reason; `hopwatch_step_failures_total` series
    # start at 0 for these and the runner's own (timeout, error). Default: every reason.
    failures: tuple[type[StepFailed], ...] = FAILURES
    # Its span: name, kind, attributes. Default: an internal span "<kind> <step>".
    span: Callable[[ConfigT, StepContext], SpanShape] | None = None
    # A waiting kind registers its expectation when the run starts, before any step runs, so
    # a reply faster than the triggering step's own response is never lost.
    expect: Callable[[ConfigT, StepContext], None] | None = None
    # The webhook route the public listener must serve for the step.
    listens: Callable[[ConfigT], WebhookRoute] | None = None
    # The `kafka.clusters` entry the step uses (checked when its flow file loads).
    cluster: Callable[[ConfigT], str] | None = None
    # The Kafka (cluster, topic) the shared consumer must watch for the step.
    watches: Callable[[ConfigT], tuple[str, str]] | None = None
    # The TLS settings the shared HTTP pool builds an SSL context for, once.
    tls: Callable[[ConfigT], TlsConfig | None] | None = None
    # A step of the kind sends exactly one request through the shared HTTP pool (`tls` set):
    # a run with no other such step gets its fresh connection from a shared closing session
    # instead of a session of its own (the same new connection, ~60 µs less a run).
    one_request: bool = False
    # Its long-lived resources (a pool per database URL, a channel per target): the engine
    # makes them once at start when a step uses the kind, lends them to every run as
    # `ctx.shared[name]` and closes them at stop. Made lazily inside, per rendered target.
    shared: Callable[[], Shared] | None = None
    name: str = field(init=False)

    def __post_init__(self) -> None:
        kind = self.config.model_fields.get("kind")
        names = get_args(kind.annotation) if kind is not None else ()
        if len(names) != 1 or not isinstance(names[0], str):
            raise TypeError(
                f"{self.config.__qualname__} needs one `kind: Literal[...]` field to be a kind"
            )
        object.__setattr__(self, "name", names[0])

    @property
    def reasons(self) -> tuple[str, ...]:
        """The reasons the kind's steps can fail with: its own, then the runner's."""
        own = [f.reason for f in self.failures]
        return tuple(dict.fromkeys([*own, *_RUNNER_REASONS]))

    def span_shape(self, config: ConfigT, ctx: StepContext) -> SpanShape:
        if self.span is not None:
            return self.span(config, ctx)
        return SpanShape(f"{self.name} {config.name}", "internal")


class Kinds(Mapping[str, KindSpec[Any]]):
    """The registry: kind name → spec. `version` changes with every registration, so the
    config models (whose step union is derived from here) know when to rebuild."""

    def __init__(self, specs: tuple[KindSpec[Any], ...] = ()) -> None:
        self._specs: dict[str, KindSpec[Any]] = {}
        self.version = 0
        for spec in specs:
            self.register(spec)

    def __getitem__(self, name: str) -> KindSpec[Any]:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def register(self, spec: KindSpec[Any]) -> None:
        """Add a kind; a second, different kind of the same name is refused."""
        known = self._specs.get(spec.name)
        if known is spec:
            return
        if known is not None:
            raise ValueError(f"kind {spec.name!r} is already registered")
        self._specs[spec.name] = spec
        self.version += 1

    def unregister(self, name: str) -> None:
        """Remove a kind (tests that register their own put things back this way)."""
        if self._specs.pop(name, None) is not None:
            self.version += 1

    def load_entry_points(self) -> None:
        """Register the kinds installed packages offer in the `hopwatch.kinds` group. A broken
        one is logged and left out: flows that use it then fail validation as unknown."""
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                spec = point.load()
                if not isinstance(spec, KindSpec):
                    raise TypeError(f"{point.value} is a {type(spec).__name__}, not a KindSpec")
                self.register(spec)
            except Exception:
                log.exception("kind %r from entry point %s not loaded", point.name, point.value)

    def asked(
        self,
        steps: Iterable[Any],
        need: Callable[[KindSpec[Any]], Callable[[Any], T | None] | None],
    ) -> list[T]:
        """What the steps' kinds ask the engine to prepare, e.g. `lambda kind: kind.tls`."""
        out: list[T] = []
        for step in steps:
            ask = need(self[step.kind])
            if ask is not None and (value := ask(step)) is not None:
                out.append(value)
        return out

    def union(self) -> Any:
        """The discriminated union of every kind's config model, for a `steps` field."""
        configs = tuple(spec.config for spec in self._specs.values())
        return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007


def render_quietly(ctx: StepContext, text: str) -> str:
    """`text` rendered for the run, or as written when it cannot be: a span name or attribute
    is not worth failing a step for (the probe reports the template's trouble)."""
    if "{{" not in text:
        return text
    try:
        return ctx.render(text)
    except Exception:
        return text
