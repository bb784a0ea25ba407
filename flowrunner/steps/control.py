"""Steps that run other steps: ``for_each``, ``group``, ``switch`` and ``call``."""

from __future__ import annotations

import asyncio
from typing import Any

from flowrunner.expressions import to_text
from flowrunner.model import CallStep, ForEachStep, GroupStep, SwitchStep
from flowrunner.runtime import RunContext, Scope, StepFailed, StepResult, step_result


async def run_for_each(step: ForEachStep, scope: Scope, run: RunContext, path: str) -> StepResult:
    # A bare `for_each: steps.x.outputs.ids` is an expression, as `if:` and `switch:` are.
    items = scope.condition(step.for_each) if isinstance(step.for_each, str) else step.for_each
    if isinstance(items, dict):
        items = [{"key": k, "value": v} for k, v in items.items()]
    if items is None:
        items = []
    if not isinstance(items, list | tuple):
        raise StepFailed(f"for_each needs a list, got {type(items).__name__}")
    results: list[Any] = [None] * len(items)
    # The items in order, taken in turn by as many workers as the concurrency allows: a
    # task per worker, not one per item waiting on a semaphore (that costs more than a
    # short request, and a task per item of a long list holds memory for nothing).
    turns = iter(enumerate(items))

    async def worker() -> None:
        task = asyncio.current_task()
        cancelled_before = _cancelling(task)
        for index, item in turns:
            if _cancelling(task) > cancelled_before:
                # Cancelled (a timeout, a shutdown, another iteration's failure) and an
                # iteration went on regardless, e.g. a step with `on_error: continue` that
                # failed on the way out: take no more items.
                raise asyncio.CancelledError
            child = scope.child(item=item, index=index)
            await run.run_steps(step.steps, child, f"{path}[{index}]")
            results[index] = {s.id: child.steps.get(s.id) for s in step.steps}

    if step.concurrency == 1 or len(items) <= 1:
        await worker()
    else:
        task = asyncio.current_task()
        cancelled_before = _cancelling(task)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(step.concurrency, len(items))):
                    group.create_task(worker())
        except BaseExceptionGroup as failures:
            if task is not None and _cancelling(task) > cancelled_before:
                # Python 3.11's TaskGroup leaves the task that ran it marked as being
                # cancelled after a child failed (3.12 takes the mark back itself): a later
                # check of that mark must not see a cancellation that never came.
                task.uncancel()
            # The first iteration to fail ended the loop: report it, not the group.
            raise _first(failures) from None
    return step_result(outputs=results)


def _cancelling(task: asyncio.Task[Any] | None) -> int:
    return task.cancelling() if task is not None else 0


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


async def run_group(step: GroupStep, scope: Scope, run: RunContext, path: str) -> StepResult:
    try:
        try:
            await run.run_steps(step.group, scope, path)
        except StepFailed as failure:
            if not step.catch:
                raise
            error = {"message": failure.message, "step": failure.step}
            # Catch steps share the group's step results, like the group's own steps.
            catch_scope = Scope({**scope.names, "error": error}, scope.run)
            await run.run_steps(step.catch, catch_scope, f"{path}.catch")
            return step_result(error=failure.message)
    finally:
        if step.finally_:
            await run.run_steps(step.finally_, scope, f"{path}.finally")
    return step_result()


async def run_switch(step: SwitchStep, scope: Scope, run: RunContext, path: str) -> StepResult:
    value = to_text(scope.condition(step.switch))
    chosen = step.cases.get(value)
    if chosen is None:
        chosen = step.default
        value = "default"
    await run.run_steps(chosen, scope, f"{path}.{value}")
    return step_result(outputs={"case": value})


async def run_call(step: CallStep, scope: Scope, run: RunContext, path: str) -> StepResult:
    inputs = scope.render(step.inputs)
    outputs = await run.call_flow(step.call, inputs, run, path)
    return step_result(outputs=outputs)
