"""Control steps end to end: set, for_each, group, switch, call, wait, log, fail, respond,
`if`, `on_error: continue`, timeouts and flow outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from upstream_server import Upstream

from flowrunner.app import Runtime
from flowrunner.store.runs import RunRecord

ProjectWriter = Callable[..., Path]
RuntimeFactory = Callable[..., Runtime]


async def run_flow(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    flows: dict[str, str],
    *,
    inputs: dict[str, Any] | None = None,
    trigger: dict[str, Any] | None = None,
    **tokens: str,
) -> RunRecord:
    root = write_project(flows, **tokens)
    runtime = open_runtime(root)
    return await runtime.engine.run(
        "main", inputs=inputs or {}, trigger=trigger or {}, user_token=None, dry_run=False
    )


def steps_by_path(record: RunRecord) -> dict[str, tuple[str, str]]:
    return {step.path: (step.kind, step.status) for step in record.steps}


async def test_set_computes_values_for_later_steps(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """`set` outputs keep native types and are readable by later steps and flow outputs."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            inputs:
              n: {type: integer, default: 4}
            vars:
              greeting: hello
            steps:
              - id: calc
                set:
                  double: ${{ inputs.n * 2 }}
                  words: ${{ ['a', 'b'] + [vars.greeting] }}
                  text: "n is ${{ inputs.n }}"
              - id: again
                set: {total: "${{ steps.calc.outputs.double + steps.calc.outputs.words | length }}"}
            outputs:
              calc: ${{ steps.calc.outputs }}
              total: ${{ steps.again.outputs.total }}
            """
        },
    )
    assert record.status == "succeeded", record.error
    assert record.outputs == {
        "calc": {"double": 8, "words": ["a", "b", "hello"], "text": "n is 4"},
        "total": 11,
    }
    assert record.steps[0].outputs == record.outputs["calc"]


async def test_for_each_keeps_item_order_and_bounds_concurrency(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """for_each with concurrency 5 returns results in item order and never has more than 5
    requests in flight, while random server delays reorder completions."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: loop
                for_each: ${{ range(20) | list }}
                concurrency: 5
                steps:
                  - id: get
                    http:
                      url: @BASE@/tracked/@KEY@
                      query: {item: "${{ item }}", index: "${{ index }}"}
                    outputs: {item: $.item}
            outputs:
              items: ${{ steps.loop.outputs | map(attribute='get') | map(attribute='outputs')
                         | map(attribute='item') | list }}
            """
        },
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    assert record.outputs == {"items": [str(i) for i in range(20)]}
    assert upstream.state.count(key) == 20
    assert 2 <= upstream.state.max_in_flight[key] <= 5
    loop_paths = sorted(s.path for s in record.steps if s.path.startswith("loop["))
    assert loop_paths == sorted(f"loop[{i}].get" for i in range(20))


async def test_for_each_sequential_over_a_mapping(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """for_each over a mapping iterates key/value pairs, one at a time by default."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: loop
                for_each: "${{ {'a': 1, 'b': 2} }}"
                steps:
                  - id: pair
                    set: {line: "${{ index }}:${{ item.key }}=${{ item.value }}"}
            outputs:
              lines: ${{ steps.loop.outputs | map(attribute='pair.outputs.line') | list }}
            """
        },
    )
    assert record.status == "succeeded", record.error
    assert record.outputs == {"lines": ["0:a=1", "1:b=2"]}


async def test_for_each_failure_under_concurrency_names_the_failing_step(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A failing iteration of a concurrent for_each fails the run with that step's message."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: loop
                for_each: [1, 2, 3, 4]
                concurrency: 3
                steps:
                  - id: check
                    if: ${{ item == 3 }}
                    fail: "item ${{ item }} is not allowed"
            """
        },
    )
    assert record.status == "failed"
    assert record.error == "item 3 is not allowed"
    failed = [s for s in record.steps if s.status == "failed"]
    assert [s.path for s in failed if s.kind == "fail"] == ["loop[2].check"]


async def test_for_each_stops_taking_items_after_a_failure(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """Once an iteration fails, no later item starts: of 50 items at concurrency 3, item 2
    fails while the others wait 10 ms, and the items far behind it never run. A list with
    no items, or one, runs like any other."""
    root = write_project(
        {
            "main": """
            name: main
            steps:
              - id: loop
                for_each: ${{ range(50) | list }}
                concurrency: 3
                steps:
                  - id: pause
                    wait: 10ms
                  - id: check
                    if: ${{ item == 2 }}
                    fail: "item ${{ item }} is not allowed"
            """,
            "few": """
            name: few
            inputs: {items: {type: array}}
            steps:
              - id: loop
                for_each: ${{ inputs['items'] }}
                concurrency: 4
                steps:
                  - id: twice
                    set: {n: "${{ item * 2 }}"}
            outputs: {n: "${{ steps.loop.outputs | map(attribute='twice.outputs.n') | list }}"}
            """,
        }
    )
    engine = open_runtime(root).engine
    record = await engine.run("main")
    assert record.status == "failed"
    assert record.error == "item 2 is not allowed"
    started = {s.path.split(".")[0] for s in record.steps if s.path.startswith("loop[")}
    assert "loop[2]" in started
    assert len(started) <= 6, sorted(started)
    for items, doubled in (([], []), ([7], [14]), ([1, 2, 3], [2, 4, 6])):
        record = await engine.run("few", inputs={"items": items})
        assert record.status == "succeeded", record.error
        assert record.outputs == {"n": doubled}


async def test_for_each_takes_no_more_items_once_cancelled(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """An iteration that goes on after its cancellation (a `finally` step fails on the way
    out, and `on_error: continue` swallows that) does not make its worker take more items:
    item 0 fails, and of 20 items at concurrency 2 only the first few ever start."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: loop
                for_each: ${{ range(20) | list }}
                concurrency: 2
                steps:
                  - id: guarded
                    on_error: continue
                    group:
                      - id: pause
                        if: ${{ item != 0 }}
                        wait: 200ms
                    finally:
                      - id: cleanup
                        if: ${{ item != 0 }}
                        set: {share: "${{ 1 // (item * 0) }}"}
                  - id: check
                    if: ${{ item == 0 }}
                    fail: "item 0 is not allowed"
            """
        },
    )
    assert record.status == "failed"
    assert record.error == "item 0 is not allowed"
    started = {s.path.split(".")[0] for s in record.steps if s.path.startswith("loop[")}
    assert started <= {"loop[0]", "loop[1]", "loop[2]"}, sorted(started)


async def test_group_catch_sees_the_error_and_finally_runs(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A failure inside a group runs `catch` (with error.message) and then `finally`;
    the run goes on and succeeds."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: attempt
                group:
                  - id: first
                    set: {x: 1}
                  - id: broken
                    fail: "broken on purpose"
                  - id: never
                    set: {x: 2}
                catch:
                  - id: handled
                    set: {message: "${{ error.message }}", step: "${{ error.step }}"}
                finally:
                  - id: cleanup
                    log: cleaning up
              - id: after
                set: {ok: true}
            outputs:
              handled: ${{ steps.handled.outputs }}
              group_error: ${{ steps.attempt.error }}
            """
        },
    )
    assert record.status == "succeeded", record.error
    assert record.outputs == {
        "handled": {"message": "broken on purpose", "step": "broken"},
        "group_error": "broken on purpose",
    }
    assert [s.path for s in record.steps] == [
        "attempt.first",
        "attempt.broken",
        "attempt.catch.handled",
        "attempt.finally.cleanup",
        "attempt",
        "after",
    ]
    assert steps_by_path(record)["attempt.broken"] == ("fail", "failed")


async def test_group_finally_runs_on_success(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """`finally` runs when the group succeeds, and `catch` does not."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: attempt
                group:
                  - id: fine
                    set: {x: 1}
                catch:
                  - id: handled
                    log: "${{ error.message }}"
                finally:
                  - id: cleanup
                    set: {done: true}
            """
        },
    )
    assert record.status == "succeeded", record.error
    assert [s.path for s in record.steps] == ["attempt.fine", "attempt.finally.cleanup", "attempt"]


async def test_group_finally_runs_when_the_failure_is_not_caught(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """Without `catch`, a failing group still runs `finally`, then fails the run."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: attempt
                group:
                  - id: broken
                    fail: "no luck"
                finally:
                  - id: cleanup
                    set: {done: true}
              - id: never
                set: {x: 1}
            """
        },
    )
    assert record.status == "failed"
    assert record.error == "no luck"
    assert [s.path for s in record.steps] == [
        "attempt.broken",
        "attempt.finally.cleanup",
        "attempt",
    ]
    assert steps_by_path(record)["attempt.finally.cleanup"] == ("set", "succeeded")


async def test_switch_runs_the_matching_case_or_default(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """`switch` runs the case equal to the value (numbers match as text), else `default`."""
    flow = """
    name: main
    inputs:
      code: {type: integer}
    steps:
      - id: route
        switch: ${{ inputs.code }}
        cases:
          200:
            - id: ok
              set: {branch: ok}
          404:
            - id: gone
              set: {branch: gone}
        default:
          - id: other
            set: {branch: other}
    outputs:
      case: ${{ steps.route.outputs.case }}
    """
    root = write_project({"main": flow})
    runtime = open_runtime(root)
    found = {}
    for code in ("200", "404", "500"):
        record = await runtime.engine.run("main", inputs={"code": code})
        assert record.status == "succeeded", record.error
        found[code] = (record.outputs["case"], [s.path for s in record.steps])
    assert found == {
        "200": ("200", ["route.200.ok", "route"]),
        "404": ("404", ["route.404.gone", "route"]),
        "500": ("default", ["route.default.other", "route"]),
    }


async def test_call_passes_inputs_and_returns_outputs(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """`call` runs another flow with rendered inputs and exposes its outputs."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: child
                call: child-flow
                inputs: {word: "hello", times: "${{ 1 + 2 }}"}
            outputs:
              result: ${{ steps.child.outputs }}
            """,
            "child": """
            name: child-flow
            inputs:
              word: {type: string}
              times: {type: integer, default: 1}
            steps:
              - id: echo
                http:
                  method: POST
                  url: @BASE@/echo
                  json: {text: "${{ inputs.word * inputs.times }}"}
                outputs: {text: $.json.text}
            outputs:
              text: ${{ steps.echo.outputs.text }}
              times: ${{ inputs.times }}
            """,
        },
    )
    assert record.status == "succeeded", record.error
    assert record.outputs == {"result": {"text": "hellohellohello", "times": 3}}
    assert [s.path for s in record.steps] == ["child>echo", "child"]
    assert record.steps[0].request is not None and record.steps[0].request["method"] == "POST"


async def test_wait_pauses_the_run(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """`wait` pauses for its duration."""
    started = time.monotonic()
    record = await run_flow(
        write_project,
        open_runtime,
        {"main": "name: main\nsteps:\n  - id: pause\n    wait: 150ms\n"},
    )
    assert record.status == "succeeded", record.error
    assert time.monotonic() - started >= 0.14
    assert record.steps[0].duration_ms >= 140


async def test_log_records_a_masked_message(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`log` records its message in the step and the log, with secrets masked."""
    monkeypatch.setenv("LOG_SECRET", "s3cret-in-a-log")
    caplog.set_level(logging.INFO, logger="flowrunner")
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            inputs:
              who: {type: string, default: ops}
            steps:
              - id: note
                log: "for ${{ inputs.who }}: key=${{ secrets.LOG_SECRET }}!"
            """
        },
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].message == "for ops: key=***!"
    assert "for ops: key=***!" in caplog.messages
    assert "s3cret-in-a-log" not in caplog.text


async def test_fail_ends_the_run_with_its_message(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """`fail` ends the run as failed with its rendered message; later steps do not run."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            inputs:
              n: {type: integer, default: 3}
            steps:
              - id: stop
                fail: "too many: ${{ inputs.n }}"
              - id: never
                set: {x: 1}
            """
        },
    )
    assert record.status == "failed"
    assert record.error == "too many: 3"
    assert [(s.path, s.status) for s in record.steps] == [("stop", "failed")]


async def test_respond_sets_the_run_response(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """`respond` stores the webhook response (status, headers, json) on the run."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: reply
                respond:
                  status: 202
                  headers: {X-Run: "${{ run.id }}"}
                  json: {received: "${{ trigger.body.n }}", n: "${{ trigger.body.n }}"}
            """
        },
        trigger={"body": {"n": 5}, "headers": {}, "query": {}, "method": "POST", "path": "x"},
    )
    assert record.status == "succeeded", record.error
    assert record.response == {
        "status": 202,
        "headers": {"X-Run": record.id},
        "json": {"received": 5, "n": 5},
    }


async def test_if_false_skips_the_step(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """A step whose `if` is false is recorded as skipped and sends nothing."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            inputs:
              go: {type: boolean, default: false}
            steps:
              - id: maybe
                if: inputs.go
                http: {url: "@BASE@/echo?key=@KEY@"}
              - id: after
                set: {status: "${{ steps.maybe.status }}"}
            """
        },
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    assert steps_by_path(record) == {"maybe": ("http", "skipped"), "after": ("set", "succeeded")}
    assert record.steps[1].outputs == {"status": None}
    assert upstream.state.count(key) == 0


async def test_on_error_continue_exposes_the_error(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """With `on_error: continue` a failed step is recorded as continued and later steps
    read its error and status."""
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: lookup
                on_error: continue
                http: {url: "@BASE@/echo?status=404"}
              - id: after
                set:
                  failed: ${{ steps.lookup.error is not none }}
                  status: ${{ steps.lookup.status }}
                  message: ${{ steps.lookup.error }}
            """
        },
    )
    assert record.status == "succeeded", record.error
    assert steps_by_path(record)["lookup"] == ("http", "continued")
    outputs = record.steps[1].outputs
    assert outputs["failed"] is True
    assert outputs["status"] == 404
    assert "answered 404, expected 2xx" in outputs["message"]
    assert record.steps[0].error == outputs["message"]


async def test_a_flow_timeout_of_zero_means_no_limit(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            timeout: 0s
            steps:
              - id: pause
                wait: 50ms
            """
        },
    )
    assert record.status == "succeeded", record.error


async def test_flow_timeout_fails_the_run(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A flow `timeout` ends a run that takes longer, and says so."""
    started = time.monotonic()
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            timeout: 300ms
            steps:
              - id: quick
                set: {x: 1}
              - id: pause
                wait: 10s
              - id: never
                set: {x: 2}
            """
        },
    )
    assert time.monotonic() - started < 5
    assert record.status == "failed"
    assert record.error == "the run exceeded the flow's timeout of 300ms"
    assert [(s.path, s.status, s.error) for s in record.steps] == [
        ("quick", "succeeded", None),
        ("pause", "failed", "cancelled before it finished (a timeout, or a parallel step failed)"),
    ]


async def test_step_timeout_fails_the_step(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """A step `timeout` interrupts a slow request; with on_error continue the run goes on."""
    started = time.monotonic()
    record = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: slow
                timeout: 300ms
                on_error: continue
                http: {url: "@BASE@/slow?delay=3"}
              - id: pause
                timeout: 200ms
                wait: 5s
            """
        },
    )
    assert time.monotonic() - started < 3
    assert record.status == "failed"
    assert record.error == "step pause: timed out after 200ms"
    assert [(s.path, s.status, s.error) for s in record.steps] == [
        ("slow", "continued", "timed out after 300ms"),
        ("pause", "failed", "timed out after 200ms"),
    ]
    slow = record.steps[0]  # the interrupted request is still in the history
    assert slow.request is not None and slow.request["url"].endswith("/slow?delay=3")
    assert slow.attempts == 1 and slow.response is None


async def test_flow_outputs_render_after_the_last_step(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """Flow outputs render after the last step, keeping native types."""
    good = await run_flow(
        write_project,
        open_runtime,
        {
            "main": """
            name: main
            steps:
              - id: a
                set: {items: [1, 2, 3]}
            outputs:
              count: ${{ steps.a.outputs['items'] | length }}
              summary: "${{ steps.a.outputs['items'] | sum }} in total"
            """
        },
    )
    assert good.status == "succeeded", good.error
    assert good.outputs == {"count": 3, "summary": "6 in total"}
