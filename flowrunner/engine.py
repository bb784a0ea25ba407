"""The run engine: executes a validated flow, step by step, and publishes run events.

A failing step, a failing expression or an unexpected exception inside a step ends
that run (or that step, with ``on_error: continue``); it never escapes into the
process that hosts the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from flowrunner.auth.jwt import user_of_credential
from flowrunner.durations import format_duration
from flowrunner.errors import ExpressionError, FlowrunnerError
from flowrunner.events import EventBus, RunEvent
from flowrunner.loader import Project
from flowrunner.logs import current_run
from flowrunner.model import (
    CallStep,
    FailStep,
    Flow,
    ForEachStep,
    GroupStep,
    HttpStep,
    InputSpec,
    LogStep,
    RespondStep,
    SetStep,
    Step,
    SwitchStep,
    WaitStep,
)
from flowrunner.runtime import (
    INTERRUPTED_MESSAGE,
    AuthProvider,
    FlowFailed,
    RunContext,
    RunStatus,
    Scope,
    StepFailed,
    StepResult,
    StepStatus,
    elapsed_ms,
    step_result,
)
from flowrunner.secrets import Masker, MaskingFilter, SecretStore, current_masker
from flowrunner.steps import basic, control
from flowrunner.steps.http import HttpCall, run_http_step
from flowrunner.store.runs import RunRecord, StepRecord
from flowrunner.wire import HttpxWire, Wire

log = logging.getLogger("flowrunner.engine")
log.addFilter(MaskingFilter())  # unexpected exceptions are logged with their message
MAX_CALL_DEPTH = 10
_SENSITIVE_HEADERS = ("authorization", "cookie", "proxy-authorization", "x-api-key")


class Engine:
    def __init__(
        self,
        project: Project,
        client: httpx.AsyncClient,
        auth: AuthProvider,
        secrets: SecretStore,
        bus: EventBus | None = None,
        clock: Callable[[], datetime] | None = None,
        wire: Wire | None = None,
    ) -> None:
        self.project = project
        self.client = client
        # The http step's requests: through the client itself unless a wire is given.
        self.wire = wire or HttpxWire(client)
        self.auth = auth
        self.secrets = secrets
        self.bus = bus or EventBus()
        self.clock = clock or (lambda: datetime.now(UTC))

    def flow(self, name: str) -> Flow:
        loaded = self.project.flows.get(name)
        if loaded is None:
            if name in self.project.broken_flows:
                raise FlowrunnerError(
                    f"flow '{name}' has validation errors; run 'flowrunner validate' to see them"
                )
            raise FlowrunnerError(f"no flow named '{name}'")
        return loaded.flow

    async def run(
        self,
        flow_name: str,
        *,
        trigger: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        user_token: str | None = None,
        run_id: str | None = None,
        dry_run: bool = False,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> RunRecord:
        flow = self.flow(flow_name)
        masker = Masker()
        masker_token = current_masker.set(masker)
        run_id = run_id or new_run_id()
        log_token = current_run.set((run_id, flow.name))
        try:
            return await self._run(
                flow,
                trigger or {},
                inputs or {},
                user_token,
                run_id,
                dry_run,
                on_step,
                masker,
            )
        finally:
            current_masker.reset(masker_token)
            current_run.reset(log_token)

    async def _run(
        self,
        flow: Flow,
        trigger: dict[str, Any],
        inputs: dict[str, Any],
        user_token: str | None,
        run_id: str,
        dry_run: bool,
        on_step: Callable[[StepRecord], None] | None,
        masker: Masker,
    ) -> RunRecord:
        if user_token:
            masker.add(user_token)
            masker.add(user_token.removeprefix("Bearer ").strip())
        headers = trigger.get("headers") or {}
        for name, value in headers.items():
            if str(name).lower() in _SENSITIVE_HEADERS:
                masker.add(value)
                masker.add(str(value).split(" ", 1)[-1])
        # run.user: whose token the run carries, as the token's claims name them.
        user = user_of_credential(user_token)
        record = RunRecord(
            id=run_id,
            flow=flow.name,
            status=RunStatus.RUNNING,
            trigger=masker.mask_value(trigger),  # type: ignore[arg-type]
            inputs=masker.mask_value(inputs),  # type: ignore[arg-type]
            started_at=self.clock(),
            user=user,
        )
        context = RunContext(
            run_id=run_id,
            flow_name=flow.name,
            started_at=record.started_at,
            masker=masker,
            client=self.client,
            wire=self.wire,
            auth=self.auth,
            run_steps=self._run_steps,
            call_flow=self._call_flow,
            user_token=user_token,
            trigger=trigger,
            user=user,
            dry_run=dry_run,
            on_step=on_step,
        )
        if (pending := self.bus.notify(RunEvent("run_started", record))) is not None:
            await pending
        try:
            if not flow.timeout:  # none, or 0s: no limit
                record.outputs = await self._execute(flow, trigger, inputs, context, "")
            else:
                async with asyncio.timeout(flow.timeout.total_seconds()):
                    record.outputs = await self._execute(flow, trigger, inputs, context, "")
            record.status = RunStatus.SUCCEEDED
        except TimeoutError:
            record.status = RunStatus.FAILED
            limit = format_duration(flow.timeout) if flow.timeout else "?"
            record.error = f"the run exceeded the flow's timeout of {limit}"
        except (StepFailed, ExpressionError) as failure:
            record.status = RunStatus.FAILED
            step = getattr(failure, "step", None)
            prefix = "" if isinstance(failure, FlowFailed) or not step else f"step {step}: "
            record.error = masker.mask(prefix + failure.message)
        except Exception as exc:  # a bug of ours must not take the process down
            log.exception("run %s of %s failed unexpectedly", run_id, flow.name)
            record.status = RunStatus.FAILED
            record.error = masker.mask(f"internal error: {type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            # Shutting down: the run ends as interrupted, and its subscribers hear of it.
            record.status = RunStatus.INTERRUPTED
            record.error = INTERRUPTED_MESSAGE
            record.finished_at = self.clock()
            record.steps = context.records
            await self.bus.publish(RunEvent("run_finished", record))
            raise
        record.finished_at = self.clock()
        record.steps = context.records
        record.response = context.response
        if record.outputs is not None:
            record.outputs = masker.mask_value(record.outputs)
        if (pending := self.bus.notify(RunEvent("run_finished", record))) is not None:
            await pending
        return record

    async def _execute(
        self,
        flow: Flow,
        trigger: dict[str, Any],
        inputs: dict[str, Any],
        context: RunContext,
        prefix: str,
    ) -> Any:
        resolved = resolve_inputs(flow.inputs, inputs)
        scope = Scope(
            {
                "trigger": trigger,
                "inputs": resolved,
                "vars": {},
                "steps": {},
                "secrets": self.secrets.view(context.masker),
                "run": {
                    "id": context.run_id,
                    "flow": flow.name,
                    "started_at": context.started_at.isoformat(),
                    "user": context.user,
                },
            },
            context,
        )
        for name, value in flow.vars.items():
            scope.names["vars"][name] = scope.render(value)
        await self._run_steps(flow.steps, scope, prefix)
        if not flow.outputs:
            return None
        try:
            return scope.render(flow.outputs)
        except ExpressionError:
            if context.dry_run:
                return None  # without responses there is nothing to compute them from
            raise

    async def _run_steps(self, steps: list[Step], scope: Scope, prefix: str) -> None:
        for step in steps:
            await self._run_step(step, scope, prefix)

    async def _run_step(self, step: Step, scope: Scope, prefix: str) -> None:
        run = scope.run
        # A called flow's steps read "call>step"; nested steps "parent.step".
        path = f"{prefix}.{step.id}" if prefix and not prefix.endswith(">") else prefix + step.id
        started = time.perf_counter()
        record = StepRecord(
            seq=0,
            path=path,
            kind=step.kind,
            status=StepStatus.SUCCEEDED,
            started_at=datetime.now(UTC),
            duration_ms=0,
        )
        # Made here so that a request interrupted by a timeout still reaches the history.
        call: HttpCall | None = HttpCall(step, scope, run) if type(step) is HttpStep else None
        try:
            if step.if_ is not None and not scope.condition(step.if_):
                record.status = StepStatus.SKIPPED
                scope.steps[step.id] = step_result()
                return
            if step.timeout is None:
                result, message = await self._dispatch(step, scope, run, path, call)
            else:
                async with asyncio.timeout(step.timeout.total_seconds()):
                    result, message = await self._dispatch(step, scope, run, path, call)
            record.message = message
            record.outputs = run.excerpt(result["outputs"]) if result["outputs"] else None
            scope.steps[step.id] = result
        except Exception as failure:
            message = _failure_message(failure, step)
            if run.dry_run and isinstance(failure, ExpressionError):
                # Without responses, later steps cannot be rendered; say so and go on.
                record.status = StepStatus.SKIPPED
                record.message = f"not rendered in a dry run: {message}"
                scope.steps[step.id] = step_result()
                return
            result = getattr(failure, "result", None) or step_result()
            result["error"] = message
            record.error = message
            if isinstance(failure, StepFailed) and failure.step and failure.step != step.id:
                record.error = f"in step {failure.step}: {message}"
            if not isinstance(failure, StepFailed | ExpressionError | TimeoutError):
                log.exception("step %s failed unexpectedly", path)
            if step.on_error == "continue" and not isinstance(failure, FlowFailed):
                record.status = StepStatus.CONTINUED
                scope.steps[step.id] = result
            else:
                record.status = StepStatus.FAILED
                raise _as_step_failure(failure, step, message) from None
        except asyncio.CancelledError:
            # Interrupted from outside: the flow's timeout, or a failed parallel iteration.
            record.status = StepStatus.FAILED
            record.error = "cancelled before it finished (a timeout, or a parallel step failed)"
            raise
        finally:
            if call is not None:
                record.request = call.request_record
                record.response = call.response_record
                record.attempts = call.attempts
            record.duration_ms = elapsed_ms(started)
            run.record(record)

    async def _dispatch(
        self, step: Step, scope: Scope, run: RunContext, path: str, call: HttpCall | None
    ) -> tuple[StepResult, str | None]:
        # By exact type: isinstance of a pydantic model that is not the class asked
        # about looks up its __class__ through the model's slow attribute hook.
        if type(step) is HttpStep:
            result, _ = await run_http_step(step, scope, run, call)
            return result, None
        if type(step) is SetStep:
            return await basic.run_set(step, scope, run), None
        if type(step) is ForEachStep:
            return await control.run_for_each(step, scope, run, path), None
        if type(step) is GroupStep:
            return await control.run_group(step, scope, run, path), None
        if type(step) is SwitchStep:
            return await control.run_switch(step, scope, run, path), None
        if type(step) is CallStep:
            return await control.run_call(step, scope, run, path), None
        if type(step) is WaitStep:
            return await basic.run_wait(step, scope, run), None
        if type(step) is LogStep:
            result, message = await basic.run_log(step, scope, run)
            return result, message
        if type(step) is FailStep:
            return await basic.run_fail(step, scope, run), None
        if type(step) is RespondStep:
            return await basic.run_respond(step, scope, run), None
        raise StepFailed(f"unknown step kind {step.kind}")

    async def _call_flow(
        self, name: str, inputs: dict[str, Any], run: RunContext, path: str
    ) -> Any:
        if path.count(">") >= MAX_CALL_DEPTH:
            raise StepFailed(f"calls nest deeper than {MAX_CALL_DEPTH} flows; is there a loop?")
        return await self._execute(self.flow(name), {}, inputs, run, f"{path}>")


def new_run_id() -> str:
    """A random (version 4) UUID as text: what ``str(uuid.uuid4())`` gives, for a third of
    its cost (every run pays it).

    The random bytes come from the OS, as uuid4's, but for ``_IDS_PER_READ`` ids at a
    time: reading them releases the GIL, and under load the event loop then waited for
    the writer thread to hand it back (4% of a webhook's samples at 16 clients)."""
    with _ids_lock:
        if not _ids:
            h = os.urandom(16 * _IDS_PER_READ).hex()
            _ids.extend(_uuid4_text(h[i : i + 32]) for i in range(0, len(h), 32))
        return _ids.pop()


def _uuid4_text(h: str) -> str:
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
_IDS_PER_READ = 256
_ids: list[str] = []
_ids_lock = threading.Lock()
# A forked child must not hand out the ids its parent will.
os.register_at_fork(after_in_child=_ids.clear)


def _failure_message(failure: BaseException, step: Step) -> str:
    if isinstance(failure, TimeoutError):
        return f"timed out after {format_duration(step.timeout)}" if step.timeout else "timed out"
    if isinstance(failure, StepFailed | ExpressionError):
        return failure.message
    return f"internal error: {type(failure).__name__}: {failure}"


def _as_step_failure(failure: BaseException, step: Step, message: str) -> StepFailed:
    if isinstance(failure, FlowFailed):
        return failure
    if isinstance(failure, StepFailed) and failure.step:
        return failure
    return StepFailed(message, step=step.id)


_COERCE: dict[str, Callable[[str], Any]] = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": lambda text: text.strip().lower() in ("1", "true", "yes", "on"),
}


def resolve_inputs(specs: dict[str, InputSpec], given: dict[str, Any]) -> dict[str, Any]:
    """Apply defaults, check required inputs, and read text (``--input k=v``) as its type."""
    unknown = [name for name in given if name not in specs]
    if unknown:
        raise StepFailed(
            f"unknown input '{unknown[0]}'; this flow takes: {', '.join(specs) or 'no inputs'}"
        )
    resolved: dict[str, Any] = {}
    for name, spec in specs.items():
        if name not in given:
            if spec.required:
                raise StepFailed(f"input '{name}' is required")
            resolved[name] = spec.default
            continue
        value = given[name]
        if isinstance(value, str) and spec.type in _COERCE:
            try:
                value = _COERCE[spec.type](value)
            except ValueError:
                raise StepFailed(f"input '{name}' must be {spec.type}, got {value!r}") from None
        elif isinstance(value, str) and spec.type in ("object", "array"):
            import json

            try:
                value = json.loads(value)
            except ValueError:
                raise StepFailed(f"input '{name}' must be JSON ({spec.type})") from None
        resolved[name] = value
    return resolved
