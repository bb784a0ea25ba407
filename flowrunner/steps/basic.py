"""Steps that do one thing: ``set``, ``wait``, ``log``, ``fail`` and ``respond``."""

from __future__ import annotations

import asyncio
import logging

from flowrunner.expressions import compile_value, to_text
from flowrunner.model import FailStep, LogStep, RespondStep, SetStep, WaitStep
from flowrunner.model.base import PerModel
from flowrunner.runtime import FlowFailed, RunContext, Scope, StepResult, step_result

log = logging.getLogger("flowrunner.flow")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


async def run_set(step: SetStep, scope: Scope, run: RunContext) -> StepResult:
    return step_result(outputs={str(k): scope.render(v) for k, v in step.set.items()})


async def run_wait(step: WaitStep, scope: Scope, run: RunContext) -> StepResult:
    if not run.dry_run:
        await asyncio.sleep(step.wait.total_seconds())
    return step_result()


async def run_log(step: LogStep, scope: Scope, run: RunContext) -> tuple[StepResult, str]:
    message = run.masker.mask(to_text(scope.render(step.log)))
    log.log(_LEVELS[step.level], message, extra={"run_id": run.run_id, "flow": run.flow_name})
    return step_result(outputs={"message": message}), message


async def run_fail(step: FailStep, scope: Scope, run: RunContext) -> StepResult:
    raise FlowFailed(to_text(scope.render(step.fail)), step=step.id)


class _RespondPlan:
    """A respond step's answer, compiled once (see ``PerModel``): most webhook runs end
    with one."""

    __slots__ = ("body", "headers", "json", "status")

    def __init__(self, step: RespondStep) -> None:
        spec = step.respond
        self.status = spec.status
        self.headers = compile_value(spec.headers)
        self.json = compile_value(spec.json_) if "json_" in spec.model_fields_set else None
        self.body = compile_value(spec.body) if spec.body is not None else None


_respond_plan_of = PerModel(_RespondPlan)


async def run_respond(step: RespondStep, scope: Scope, run: RunContext) -> StepResult:
    plan, names = _respond_plan_of(step), scope.names
    response = {
        "status": plan.status,
        "headers": {str(k): to_text(v) for k, v in plan.headers(names).items()},
    }
    if plan.json is not None:
        response["json"] = plan.json(names)
    elif plan.body is not None:
        response["body"] = to_text(plan.body(names))
    run.response = response
    return step_result(status=plan.status, body=response.get("json", response.get("body")))
