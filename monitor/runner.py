"""Executes one run of a flow: owns time, the broken-link decision, cleanup and the sinks hand-off.

A probe only does the step's work; the runner puts `asyncio.timeout` around it, turns what it
raised into a StepResult with a reason, skips the steps after the first failure, always runs
cleanup, and submits one RunResult.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from asyncio import current_task
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from monitor.config import Flow
from monitor.results import RunResult, StepResult
from monitor.sinks import FanOut
from monitor.step_timeout import step_timeout
from monitor.templates import Templates
from monitor.tracing import Tracing
from probes import KINDS
from probes.arrivals import CorrelatorPort
from probes.base import HttpClients, RunInfo, Shared, StepContext, StepOutcome
from probes.errors import StepFailed, TemplateError
from probes.kafka_port import KafkaPort

log = logging.getLogger(__name__)

CLEANUP_BUDGET = 5.0  # seconds cleanup may take beyond an exhausted run timeout


def new_run_id() -> str:
    """24 hex digits: the time in milliseconds, then 48 random bits (UUIDv7's layout, shorter).

    Ids made later sort later, so the store's indexes on them (the runs' key, the hops' run
    ids) grow at one end: random 16-digit ids put every insert on a random page, which cost
    the SQLite store twice the CPU a run at 20,000 stored runs and 2.6x at two million.
    Unique enough to correlate (a clash needs two runs in one millisecond to draw the same 48
    bits), and not a secret (so no os.urandom per run).
    """
    return f"{time.time_ns() // 1_000_000:012x}{_ids.getrandbits(48):012x}"


_ids = random.Random()


_STEP_REF = re.compile(r"\bsteps\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)")


def step_references(step: Any) -> tuple[tuple[str, str], ...]:
    """The `steps.<name>.<var>` values a step's templates use, in order, each once."""
    found: dict[tuple[str, str], None] = {}
    for text in _strings(step.model_dump()):
        if "{" in text:
            for match in _STEP_REF.finditer(text):
                found[(match[1], match[2])] = None
    return tuple(found)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _strings(v)]
    return []


@dataclass
class RunnerDeps:
    """Long-lived resources the engine lends to every run."""

    templates: Templates
    http: HttpClients
    sinks: FanOut
    location: str = "local"
    marker_header: str = "X-Hopwatch-Run"
    public_url: str = "http://127.0.0.1:8080"
    correlator: CorrelatorPort | None = None
    kafka: KafkaPort | None = None
    tracing: Tracing | None = None  # when traces are on
    # what to await to release a run's resources, or None when there is nothing to wait for
    release_run: Callable[[StepContext], Awaitable[None] | None] | None = None
    replica: str | None = None  # named on every result when in a cluster
    # (flow, variant, start, end) → whether a maintenance window covered the run
    in_maintenance: Callable[[str, str, float, float], bool] | None = None
    shared: dict[str, Shared] = field(default_factory=dict)  # the kinds' own, by kind name


@dataclass(slots=True)
class _Plan:
    """What every run of one flow reads of its config, read once per flow (flows are frozen;
    a pydantic model's attribute costs about four times a slot's)."""

    flow: Flow
    name: str
    location: str | None
    timeout: float
    steps: list[Any]
    cleanup: list[Any]
    reuse_connections: bool
    cookies: bool
    one_request: bool
    variants: dict[str, dict[str, Any]]  # variant → its values, dumped on its first run
    waiting: list[tuple[str, Any, Callable[..., None]]]  # (name, step, its kind's `expect`)


class Runner:
    def __init__(self, deps: RunnerDeps) -> None:
        self.deps = deps
        self._plans: dict[int, _Plan] = {}  # flow's identity → its plan
        self._needs: dict[int, tuple[Any, tuple[tuple[str, str], ...]]] = {}  # cleanup step → refs
        # step's identity → (the step, its name, kind and timeout)
        self._steps: dict[int, tuple[Any, str, str, float | None]] = {}

    def _plan(self, flow: Flow) -> _Plan:
        plan = self._plans.get(id(flow))
        if plan is None or plan.flow is not flow:
            plan = self._plans[id(flow)] = _Plan(
                flow=flow,
                name=flow.name,
                location=flow.location,
                timeout=flow.timeout,
                steps=list(flow.steps),
                cleanup=list(flow.cleanup),
                reuse_connections=flow.reuse_connections,
                cookies=flow.cookies,
                one_request=self._sends_one_request(flow),
                variants={},
                waiting=[
                    (step.name, step, expect)
                    for step in flow.steps
                    if (expect := KINDS[step.kind].expect) is not None
                ],
            )
        return plan

    def _context(self, plan: _Plan, variant: str, run_id: str, deadline: float) -> StepContext:
        d = self.deps
        values = plan.variants.get(variant)
        if values is None:  # (keyed by the flow, not its name: a reload may change them)
            values = plan.variants[variant] = plan.flow.variants[variant].model_dump()
        # Positional arguments, in the fields' order: calling a class with keywords has
        # CPython 3.11 build a dict of them and unpack it again (~1,400 instructions a call,
        # four such objects a run). tests/test_runner.py checks every field lands right.
        return StepContext(
            RunInfo(run_id, f"hw-{run_id}", plan.name, variant, plan.location or d.location),
            values,  # variant
            {},  # steps
            d.templates,  # renderer
            d.http,
            d.marker_header,
            d.public_url,
            deadline,
            plan.reuse_connections,
            plan.one_request,
            plan.cookies,
            d.correlator,
            d.kafka,
            dict,  # propagation (the field's default)
            d.shared,
        )

    @staticmethod
    def _sends_one_request(flow: Flow) -> bool:
        """Whether a run of `flow` sends one HTTP request in all: its fresh connection can then
        come from a shared session that closes it, not a session built and closed per run."""
        steps = (*flow.steps, *flow.cleanup)
        users = [KINDS[step.kind] for step in steps if KINDS[step.kind].tls is not None]
        return not flow.reuse_connections and len(users) == 1 and users[0].one_request

    async def run(self, flow: Flow, variant: str, *, submit: bool = True) -> RunResult:
        """Run `flow` once for `variant`; the result goes to the sinks (unless submit=False)."""
        run_id = new_run_id()
        started_unix = time.time()
        started = time.monotonic()
        plan = self._plan(flow)
        ctx = self._context(plan, variant, run_id, started + plan.timeout)
        tracing = self.deps.tracing
        results: list[StepResult] = []
        outcome = "success"
        span_scope = tracing.run_scope(ctx) if tracing is not None else None
        trace_id = None
        try:
            if span_scope is not None:
                trace_id = span_scope.__enter__()
            self._register_expectations(plan, ctx)
            try:
                broken: StepResult | None = None
                for step in plan.steps:
                    if broken is not None:
                        skipped = self._skipped(step, ctx, started, started_unix)
                        # says why on every surface (page, API, JUnit): not broken, not run
                        skipped.message = f"skipped: {broken.name} broke ({broken.reason})"
                        results.append(skipped)
                        continue
                    step_result = await self._step(step, ctx, started, started_unix, cleanup=False)
                    results.append(step_result)
                    if step_result.status == "failed":
                        broken = step_result
                outcome = "failure" if broken is not None else "success"
                if submit and plan.cleanup:  # the links' signal does not wait for cleanup
                    self.deps.sinks.verdict(
                        self._result(ctx, started, started_unix, outcome, list(results), trace_id)
                    )
            except asyncio.CancelledError:
                outcome = "aborted"
                self._mark_aborted(flow, results, ctx, started, started_unix)
                raise
            finally:
                if outcome != "aborted":
                    for step in plan.cleanup:
                        results.append(
                            await self._cleanup(step, ctx, started, started_unix, results)
                        )
                release = self.deps.release_run  # no coroutine per run when nothing to close
                closing = release(ctx) if release is not None else None
                if closing is not None:
                    await closing
                self._release_hooks(ctx)
        finally:
            result = self._result(ctx, started, started_unix, outcome, results, trace_id)
            covered = self.deps.in_maintenance
            if covered is not None:
                end = started_unix + result.duration_s
                result.maintenance = covered(plan.name, variant, started_unix, end)
            if span_scope is not None:
                span_scope.finish(result)
            if submit:
                self.deps.sinks.submit(result)
        return result

    def _result(
        self,
        ctx: StepContext,
        started: float,
        started_unix: float,
        outcome: str,
        steps: list[StepResult],
        trace_id: str | None,
    ) -> RunResult:
        """The run as it stands now (its identity is the context's)."""
        run = ctx.run
        return RunResult(  # positional, in the fields' order (see `_context`)
            run.id,
            run.flow,
            run.variant,
            run.location,
            run.correlation,
            started_unix,
            time.monotonic() - started,  # duration_s
            outcome,  # type: ignore[arg-type]
            steps,
            trace_id,
            self.deps.replica,
        )

    @staticmethod
    def _register_expectations(plan: _Plan, ctx: StepContext) -> None:
        """Waiting kinds register before any step runs, so a fast reply is never lost."""
        for name, step, expect in plan.waiting:
            ctx.step = name
            expect(step, ctx)

    @staticmethod
    def _release_hooks(ctx: StepContext) -> None:
        for hook in ctx.run_state.pop("_on_release", ()):
            try:
                hook()
            except Exception:
                log.exception("release hook failed")

    async def _step(
        self, step: Any, ctx: StepContext, run_start: float, run_unix: float, *, cleanup: bool
    ) -> StepResult:
        known = self._steps.get(id(step))
        if known is None or known[0] is not step:  # configs are frozen: read once per step
            known = self._steps[id(step)] = (step, step.name, step.kind, step.timeout)
        _, name, kind, step_timeout_s = known
        ctx.step = name
        now = time.monotonic()
        ctx.step_started[name] = now
        budget = ctx.deadline - now
        if cleanup:
            budget = max(budget, CLEANUP_BUDGET)
        if step_timeout_s is not None:
            budget = min(budget, step_timeout_s)
        offset = now - run_start
        result = StepResult(name, kind, "passed", run_unix + offset, offset)  # see `_context`
        if cleanup:
            result.cleanup = True
        tracing = self.deps.tracing
        scope = tracing.step_scope(ctx, step, result) if tracing is not None else None
        try:
            if scope is not None:
                scope.__enter__()
            outcome: StepOutcome | None = None
            probe = KINDS[kind].probe
            t0 = time.monotonic()
            try:  # in line, not a coroutine of its own: one frame fewer per step
                if budget <= 0:
                    raise TimeoutError
                # asyncio.timeout's rules without a context manager's calls (monitor/step_timeout)
                timeout = step_timeout(current_task(), t0 + budget)
                try:
                    outcome = await probe.run(step, ctx)
                except BaseException as error:
                    timeout.close(error)  # a CancelledError of the deadline's own: TimeoutError
                    raise
                timeout.close(None)
                result.latency_s = time.monotonic() - t0
            except Exception as exc:
                self._failed(exc, step, ctx, budget, result)
            ended = ctx.step_ended[name] = time.monotonic()
            result.duration_s = ended - now  # the waterfall draws every wait at its length
            if outcome is not None:
                result.own_latency_s = outcome.own_latency_s
                result.latency_s = (
                    outcome.latency_s if outcome.latency_s is not None else result.latency_s
                )
                result.phases = outcome.phases
                result.attributes = outcome.attributes
                result.tls_not_after = outcome.tls_not_after
                if outcome.vars:
                    ctx.steps[name] = outcome.vars
                else:
                    ctx.steps.setdefault(name, {})
        finally:
            if scope is not None:
                scope.finish(result)
        return result

    def _failed(
        self, exc: Exception, step: Any, ctx: StepContext, budget: float, result: StepResult
    ) -> None:
        """What a step's exception says, on its result (called while it is handled)."""
        redact = self.deps.templates.redactor
        result.status = "failed"
        if isinstance(exc, StepFailed):
            result.reason = exc.reason
            result.message = redact(exc.message)
            result.excerpt = redact(exc.excerpt)
            result.phases = exc.phases
            result.attributes = exc.attributes
            result.latency_s = exc.latency_s
            result.tls_not_after = exc.tls_not_after
            result.artifacts = exc.artifacts
            if exc.vars:
                ctx.steps[step.name] = exc.vars  # cleanup may need them; later hops are skipped
        elif isinstance(exc, TimeoutError):
            result.reason = "timeout"
            result.message = f"no result within {budget:.3g}s"
        elif isinstance(exc, TemplateError):
            # A flow bug (or a value a failed earlier step never produced): not the target's fault.
            result.status = "skipped" if result.cleanup else "failed"
            result.reason = None if result.cleanup else "error"
            result.message = redact(f"template: {exc}")
        else:  # our bug: report it, keep the monitor alive
            log.exception("step %s of run %s raised", step.name, ctx.run.id)
            result.reason = "error"
            result.message = redact(f"internal error: {type(exc).__name__}: {exc}")

    async def _cleanup(
        self,
        step: Any,
        ctx: StepContext,
        run_start: float,
        run_unix: float,
        done: list[StepResult],
    ) -> StepResult:
        missing = self._unproduced(step, ctx, done)
        if missing is not None:
            # nothing to clean up: what it would delete was never made (not a flow bug)
            skipped = self._skipped(step, ctx, run_start, run_unix, cleanup=True)
            skipped.message = missing
            return skipped
        try:
            return await self._step(step, ctx, run_start, run_unix, cleanup=True)
        except Exception:
            log.exception("cleanup step %s failed", step.name)
            return self._skipped(step, ctx, run_start, run_unix, cleanup=True)

    def _unproduced(self, step: Any, ctx: StepContext, done: list[StepResult]) -> str | None:
        """A plain reason to skip a cleanup step that needs a value this run never produced
        (`steps.<name>.<var>` of a step that failed or was skipped), else None."""
        needs = self._needs.get(id(step))
        if needs is None or needs[0] is not step:  # configs are frozen: read once per step
            needs = self._needs[id(step)] = (step, step_references(step))
        status = {r.name: r for r in done}
        for name, var in needs[1]:
            if var in ctx.steps.get(name, {}):
                continue
            ran = status.get(name)
            how = f"{ran.status}" if ran is not None else "did not run"
            if ran is not None and ran.reason:
                how += f": {ran.reason}"
            return (
                f"skipped: needs steps.{name}.{var}, which this run never produced ({name} {how})"
            )
        return None

    @staticmethod
    def _skipped(
        step: Any, ctx: StepContext, run_start: float, run_unix: float, *, cleanup: bool = False
    ) -> StepResult:
        now = time.monotonic()
        return StepResult(
            name=step.name,
            kind=step.kind,
            status="skipped",
            started_at=run_unix + (now - run_start),
            offset_s=now - run_start,
            cleanup=cleanup,
        )

    def _mark_aborted(
        self,
        flow: Flow,
        results: list[StepResult],
        ctx: StepContext,
        run_start: float,
        run_unix: float,
    ) -> None:
        done = {r.name for r in results}
        for step in flow.steps:
            if step.name in done:
                continue
            skipped = self._skipped(step, ctx, run_start, run_unix)
            if step.name == ctx.step:
                skipped.status = "aborted"
                skipped.message = "monitor shutting down"
            results.append(skipped)
