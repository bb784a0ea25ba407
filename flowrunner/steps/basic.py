"""Steps that do one thing: ``set``, ``wait``, ``log``, ``fail`` and ``respond``."""

from __future__ import annotations

import asyncio
import logging

from flowrunner.expressions import to_text
from flowrunner.model import FailStep, LogStep, RespondStep, SetStep, WaitStep
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


async def run_respond(step: RespondStep, scope: Scope, run: RunContext) -> StepResult:
    spec = step.respond
    response = {
        "status": spec.status,
        "headers": {str(k): to_text(v) for k, v in scope.render(spec.headers).items()},
    }
    if "json_" in spec.model_fields_set:
        response["json"] = scope.render(spec.json_)
    elif spec.body is not None:
        response["body"] = to_text(scope.render(spec.body))
    run.response = response
    return step_result(status=spec.status, body=response.get("json", response.get("body")))
