"""The canary gate over HTTP, shaped to what Argo Rollouts' `web` provider and Flagger's webhooks
expect of an answer (their docs: the `web` metric provider, Flagger webhooks).

``GET /api/v1/gate?flow=checkout&canary=canary&baseline=stable&window=10m`` (or ``burst=20``;
every GateRequest field is a query parameter of the same name, ``flow`` may repeat) answers
200 with the verdict as JSON whenever it judged, whatever the verdict: Argo counts any non-2xx
answer as an *Error*, not a *Failed* measurement, so only "could not judge" is non-2xx —
400 with ``{"error": …}`` for a bad request, 503 when the store cannot be read.
``POST /api/v1/gate`` takes the same fields as a JSON object (Argo's ``jsonBody``), merged
over the query.

``POST /api/v1/gate/flagger`` takes Flagger's webhook body ``{"name", "namespace", "phase",
"checksum", "metadata": {…}}``; the metadata carries the same fields (all strings, as Flagger
sends them). Flagger's body does not say which hook is calling, so the webhook says it with
``metadata.hook`` (or ``?hook=``), default ``rollout``:

* ``rollout``, ``pre-rollout``, ``confirm-rollout``, ``confirm-traffic-increase``,
  ``confirm-promotion``: judge; 200 when the canary may go on (pass, or marginal with
  ``allow_marginal``), else 412 with the verdict and its reasons (fail, marginal, inconclusive;
  for confirm-* hooks Flagger then waits and asks again, for rollout hooks it counts a failed
  check);
* ``rollback``: judge; 200 — which to Flagger means *roll back now* — only on ``fail``, else 412
  (do not roll back on a weak or missing signal);
* ``post-rollout`` and ``event``: 200 without judging (nothing is left to gate). Event webhooks
  are recognised by themselves: Flagger replaces their metadata with ``eventType``/``eventMessage``.

A canary in a finished phase (Succeeded, Failed, Terminating, Terminated) is not judged either:
200 (412 to a rollback hook, which must not read it as "roll back"). Malformed bodies and
unknown keys answer 400 with the error, which Flagger shows as the failed check's message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from multidict import MultiMapping
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from monitor.gate.models import GateError, GateRequest, GateResult, SourceUnavailable
from monitor.gate.service import GateEngine, evaluate, gate_metrics

__all__ = [
    "FLAGGER_PATH",
    "GATE_PATH",
    "FlaggerPayload",
    "install_gate_routes",
    "query_fields",
]

GATE_PATH = "/api/v1/gate"
FLAGGER_PATH = "/api/v1/gate/flagger"
REPEATABLE = frozenset({"flow", "critical"})
GATING_HOOKS = frozenset(
    {"rollout", "pre-rollout", "confirm-rollout", "confirm-traffic-increase", "confirm-promotion"}
)
UNJUDGED_HOOKS = frozenset({"post-rollout", "event"})
HOOKS = GATING_HOOKS | UNJUDGED_HOOKS | {"rollback"}
FINISHED_PHASES = frozenset({"Succeeded", "Failed", "Terminating", "Terminated"})


class FlaggerPayload(BaseModel):
    """Flagger's CanaryWebhookPayload; fields Flagger may add later are tolerated."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(description="The Canary's name.")
    namespace: str = Field(description="The Canary's namespace.")
    phase: str = Field(default="", description="The Canary's phase, e.g. Progressing.")
    checksum: str = Field(default="", description="Hash of the canary's tracked configuration.")
    metadata: dict[str, str] = Field(
        default_factory=dict, description="The webhook's metadata: the gate's parameters."
    )


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _validation_problems(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return problems


def query_fields(query: MultiMapping[str]) -> dict[str, Any]:
    """Query parameters as GateRequest fields: `flow` and `critical` may repeat, others not."""
    fields: dict[str, Any] = {}
    for key in query:
        if key in fields:
            continue
        values = query.getall(key)
        if key in REPEATABLE:
            fields[key] = values
        elif len(values) > 1:
            raise GateError(f"{key}: given {len(values)} times, want once")
        else:
            fields[key] = values[0]
    return fields


class GateRoutes:
    """The handlers, holding what they lend to :func:`evaluate`."""

    def __init__(
        self, engine: GateEngine | None, store: Any | None, registry: CollectorRegistry
    ) -> None:
        self.engine = engine
        self.store = store
        self.registry = registry
        # Bursts run real transactions; two controllers asking at once should not double the
        # load on the system under watch, so bursts take turns.
        self.burst_lock = asyncio.Lock()

    async def judge(self, fields: Mapping[str, Any]) -> GateResult:
        """Validate and evaluate; GateError / ValidationError / SourceUnavailable propagate."""
        request = GateRequest.model_validate(dict(fields))
        if request.burst is None:
            return await evaluate(
                request, engine=self.engine, store=self.store, registry=self.registry
            )
        async with self.burst_lock:
            return await evaluate(
                request, engine=self.engine, store=self.store, registry=self.registry
            )

    async def answer(self, fields: Mapping[str, Any]) -> web.Response | GateResult:
        """The result, or the error response a caller gets when nothing could be judged."""
        try:
            return await self.judge(fields)
        except ValidationError as exc:
            problems = _validation_problems(exc)
            return _error(400, "; ".join(problems), problems=problems)
        except GateError as exc:
            return _error(400, str(exc))
        except SourceUnavailable as exc:
            return _error(503, str(exc))

    # --- Argo Rollouts ---------------------------------------------------------------------

    async def get_gate(self, request: web.Request) -> web.StreamResponse:
        try:
            fields = query_fields(request.query)
        except GateError as exc:
            return _error(400, str(exc))
        result = await self.answer(fields)
        if isinstance(result, web.Response):
            return result
        return web.json_response(result.to_dict())

    async def post_gate(self, request: web.Request) -> web.StreamResponse:
        try:
            fields = query_fields(request.query)
            body = await request.json() if request.can_read_body else {}
        except GateError as exc:
            return _error(400, str(exc))
        except json.JSONDecodeError as exc:
            return _error(400, f"body is not JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object of gate parameters")
        result = await self.answer({**fields, **body})
        if isinstance(result, web.Response):
            return result
        return web.json_response(result.to_dict())

    # --- Flagger ---------------------------------------------------------------------------

    async def flagger(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = FlaggerPayload.model_validate(await request.json())
        except json.JSONDecodeError as exc:
            return _error(400, f"body is not JSON: {exc}")
        except ValidationError as exc:
            problems = _validation_problems(exc)
            return _error(400, "not a Flagger webhook body: " + "; ".join(problems))
        metadata = dict(payload.metadata)
        hook = metadata.pop("hook", None) or request.query.get("hook", "rollout")
        if "eventType" in metadata and "flow" not in metadata:
            hook = "event"
        context = {"name": payload.name, "namespace": payload.namespace, "phase": payload.phase}
        if hook not in HOOKS:
            return _error(400, f"unknown hook {hook!r}; want one of {', '.join(sorted(HOOKS))}")
        if hook in UNJUDGED_HOOKS or payload.phase in FINISHED_PHASES:
            why = f"{hook} hook" if hook in UNJUDGED_HOOKS else f"phase {payload.phase}"
            body = {**context, "hook": hook, "judged": False, "reason": f"{why}: nothing to gate"}
            if hook == "rollback":  # 2xx would mean "roll back now"
                return web.json_response({**body, "rollback": False}, status=412)
            return web.json_response(body)
        result = await self.answer(metadata)
        if isinstance(result, web.Response):
            return result
        return self._flagger_answer(hook, result, context)

    @staticmethod
    def _flagger_answer(hook: str, result: GateResult, context: dict[str, str]) -> web.Response:
        body = {
            **context,
            "hook": hook,
            "judged": True,
            "verdict": result.verdict,
            "passed": result.passed,
            "score": result.score,
            "reasons": result.reasons,
            "samples": {
                f.flow: {"canary": f.canary_runs, "baseline": f.baseline_runs} for f in result.flows
            },
        }
        if hook == "rollback":
            # 2xx tells Flagger to roll back now: only on clear evidence of harm.
            roll_back = result.verdict == "fail"
            return web.json_response(
                {**body, "rollback": roll_back}, status=200 if roll_back else 412
            )
        return web.json_response(body, status=200 if result.passed else 412)


def install_gate_routes(
    app: web.Application,
    *,
    engine: GateEngine | None,
    store: Any | None,
    metrics_registry: CollectorRegistry,
) -> None:
    """Add GET/POST /api/v1/gate (Argo Rollouts) and POST /api/v1/gate/flagger to `app`.

    `engine` (started) makes bursts possible and checks flow names against its config; `store`
    makes windows possible; the gate's metrics go on `metrics_registry`.
    """
    routes = GateRoutes(engine, store, metrics_registry)
    gate_metrics(metrics_registry)  # the instruments exist (and are documented) before any gate
    app.router.add_get(GATE_PATH, routes.get_gate)
    app.router.add_post(GATE_PATH, routes.post_gate)
    app.router.add_post(FLAGGER_PATH, routes.flagger)
