"""What goes wrong on the wire, end to end: retries and Retry-After, refused connections,
timeouts, 5xx storms, injected transport errors, huge bodies and run-time expression errors.

Backoff sleeps of the http step are recorded instead of slept (see ``sleeps``), so the
delays the engine asked for are asserted exactly and the tests stay fast.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
from upstream_server import Upstream

import flowrunner.steps.http as http_step
from flowrunner.app import Runtime
from flowrunner.store.runs import RunRecord

ProjectWriter = Callable[..., Path]
RuntimeFactory = Callable[..., Runtime]


class _AsyncioWithRecordedSleep:
    """Stands in for the asyncio module inside flowrunner.steps.http only."""

    def __init__(self, sleep: Callable[[float], Coroutine[Any, Any, None]]) -> None:
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the http step asked to sleep between attempts (not actually slept)."""
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(http_step, "asyncio", _AsyncioWithRecordedSleep(record))
    return delays


async def run_flow(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    flow: str,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    **tokens: str,
) -> RunRecord:
    root = write_project({"f": flow}, **tokens)
    runtime = open_runtime(root, transport=transport) if transport else open_runtime(root)
    return await runtime.engine.run("f", inputs={}, trigger={}, user_token=None, dry_run=False)


async def test_get_is_retried_on_503_until_it_succeeds(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    sleeps: list[float],
) -> None:
    """A GET answered 503 twice is retried with exponential, jittered backoff; 3 attempts."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: get
            http: {url: "@BASE@/flaky/@KEY@?fail=2&status=503"}
            outputs: {calls: $.calls}
        """,
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    step = record.steps[0]
    assert (step.attempts, step.outputs) == (3, {"calls": 3})
    assert step.response is not None and step.response["status"] == 200
    assert upstream.state.count(key) == 3
    assert len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0  # 1s then 2s, with jitter


async def test_post_is_not_retried_by_default(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    sleeps: list[float],
) -> None:
    """A POST answered 503 is not retried unless the step asks: one attempt, the run fails."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: post
            http: {method: POST, url: "@BASE@/flaky/@KEY@?fail=1", json: {a: 1}}
        """,
        KEY=key,
    )
    assert record.status == "failed"
    assert record.error is not None and "answered 503, expected 2xx" in record.error
    assert record.steps[0].attempts == 1
    assert upstream.state.count(key) == 1
    assert sleeps == []


async def test_post_is_retried_when_the_step_says_so(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    sleeps: list[float],
) -> None:
    """A POST with `retry:` is retried on 503 with the step's fixed delay."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: post
            http: {method: POST, url: "@BASE@/flaky/@KEY@?fail=1", json: {a: 1}}
            retry: {attempts: 3, backoff: fixed, delay: 200ms}
            outputs: {method: $.method}
        """,
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].attempts == 2
    assert record.steps[0].outputs == {"method": "POST"}
    assert upstream.state.count(key) == 2
    assert len(sleeps) == 1 and 0.1 <= sleeps[0] <= 0.2


async def test_retry_after_seconds_is_honoured(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """A 429 with `Retry-After: 1` makes the step wait that second before trying again."""
    key = upstream.key()
    started = time.monotonic()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: get
            timeout: 5s
            http: {url: "@BASE@/flaky/@KEY@?fail=1&status=429&after=1"}
        """,
        KEY=key,
    )
    elapsed = time.monotonic() - started
    assert record.status == "succeeded", record.error
    assert record.steps[0].attempts == 2
    assert 1.0 <= elapsed < 4.0


async def test_retry_after_as_an_http_date_is_honoured(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    sleeps: list[float],
) -> None:
    """A 503 whose Retry-After is an HTTP date 30 s ahead makes the step wait about 30 s."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: get
            http: {url: "@BASE@/flaky/@KEY@?fail=1&status=503&after=date"}
        """,
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    assert len(sleeps) == 1 and 27 <= sleeps[0] <= 30


async def test_retry_after_beyond_the_step_timeout_is_not_waited_for(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    sleeps: list[float],
) -> None:
    """A Retry-After longer than the step's timeout ends the step at once with the 429."""
    key = upstream.key()
    started = time.monotonic()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: get
            timeout: 2s
            http: {url: "@BASE@/flaky/@KEY@?fail=1&status=429&after=30"}
        """,
        KEY=key,
    )
    assert time.monotonic() - started < 2
    assert record.status == "failed"
    assert record.error is not None and "answered 429, expected 2xx" in record.error
    assert sleeps == []
    assert upstream.state.count(key) == 1


async def test_connection_refused_fails_clearly_and_the_runner_goes_on(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    closed_port: int,
    sleeps: list[float],
) -> None:
    """A refused connection is retried for a GET, then fails the run with a clear message;
    the next run of the same runtime succeeds."""
    root = write_project(
        {
            "down": f"""
            name: down
            steps:
              - id: get
                http: {{url: "http://127.0.0.1:{closed_port}/nothing"}}
            """,
            "up": """
            name: up
            steps:
              - id: get
                http: {url: "@BASE@/echo"}
            """,
        }
    )
    runtime = open_runtime(root)
    down = await runtime.engine.run("down")
    assert down.status == "failed"
    assert down.error is not None
    assert down.error.startswith(
        f"step get: GET http://127.0.0.1:{closed_port}/nothing: connection failed: ConnectError"
    )
    assert down.steps[0].attempts == 3
    assert len(sleeps) == 2
    up = await runtime.engine.run("up")
    assert up.status == "succeeded", up.error


async def test_slow_server_times_out_per_request(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """`http.timeout` bounds each request; a slower server fails the step with a timeout."""
    started = time.monotonic()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: get
            retry: {attempts: 1}
            http: {url: "@BASE@/slow?delay=3", timeout: 300ms}
        """,
    )
    assert time.monotonic() - started < 2.5
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.endswith("/slow?delay=3: timed out after 0.3s")


async def test_timeouts_are_retried_for_idempotent_requests(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    sleeps: list[float],
) -> None:
    """A GET that times out is retried like a 503 (timeout is a default retry condition)."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: get
            retry: {attempts: 2, delay: 10ms}
            http: {url: "@BASE@/slow?delay=2&key=@KEY@", timeout: 200ms}
        """,
        KEY=key,
    )
    assert record.status == "failed"
    assert record.steps[0].attempts == 2
    assert upstream.state.count(key) == 2
    assert len(sleeps) == 1


async def test_a_5xx_storm_exhausts_the_attempts(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    sleeps: list[float],
) -> None:
    """When every attempt gets a 5xx the step gives up after `attempts` and fails the run
    with the last status."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: get
            retry: {attempts: 4, delay: 100ms, max_delay: 250ms, on: [5xx]}
            http: {url: "@BASE@/flaky/@KEY@?fail=100&status=500"}
        """,
        KEY=key,
    )
    assert record.status == "failed"
    assert record.error is not None and "answered 500, expected 2xx" in record.error
    assert '"call": 4' in record.error
    assert record.steps[0].attempts == 4
    assert upstream.state.count(key) == 4
    # 100ms, 200ms, then capped at 250ms; full jitter takes half to all of each.
    assert all(cap / 2 <= d <= cap for d, cap in zip(sleeps, (0.1, 0.2, 0.25), strict=True))


async def test_injected_connect_error_is_retried_then_fails(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, sleeps: list[float]
) -> None:
    """An httpx.ConnectError from the transport counts as a connection failure: retried,
    then reported with its message."""
    calls: list[str] = []

    async def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        raise httpx.ConnectError("network is unreachable", request=request)

    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: get
            http: {url: "https://api.example.test/items"}
        """,
        transport=httpx.MockTransport(refuse),
    )
    assert record.status == "failed"
    assert record.error == (
        "step get: GET https://api.example.test/items: "
        "connection failed: ConnectError: network is unreachable"
    )
    assert len(calls) == 3 and record.steps[0].attempts == 3


async def test_injected_read_timeout_then_success(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, sleeps: list[float]
) -> None:
    """An httpx.ReadTimeout on the first attempt is retried and the second attempt wins."""
    calls: list[str] = []

    async def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            raise httpx.ReadTimeout("read timed out", request=request)
        return httpx.Response(200, json={"ok": True})

    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: get
            http: {url: "https://api.example.test/items", timeout: 5s}
            outputs: {ok: $.ok}
        """,
        transport=httpx.MockTransport(flaky),
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].attempts == 2
    assert record.steps[0].outputs == {"ok": True}


async def test_injected_read_timeout_on_a_post_is_not_retried(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, sleeps: list[float]
) -> None:
    """A POST that times out is not retried by default (it may have been applied)."""
    calls: list[str] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ReadTimeout("read timed out", request=request)

    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: post
            http: {method: POST, url: "https://api.example.test/items", timeout: 5s, json: {}}
        """,
        transport=httpx.MockTransport(slow),
    )
    assert record.status == "failed"
    assert record.error == "step post: POST https://api.example.test/items: timed out after 5s"
    assert calls == ["POST"]


async def test_huge_body_fails_the_step_and_stays_out_of_the_history(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """A 20 MB response is not read past the body limit: the step fails, and what the
    history stores about it stays small."""
    root = write_project(
        {
            "f": """
            name: f
            steps:
              - id: get
                http: {url: "@BASE@/huge"}
            """
        }
    )
    runtime = open_runtime(root)
    record = await runtime.engine.run("f")
    assert record.status == "failed"
    assert record.error == (
        "step get: the response body is larger than 10 MB; flowrunner stopped reading it"
    )
    stored = runtime.history.get_run(record.id)
    assert stored is not None and stored.steps[0].status == "failed"
    assert len(json.dumps([stored.steps[0].request, stored.steps[0].response])) < 4096
    assert stored.steps[0].attempts == 1


async def test_large_body_under_the_limit_is_stored_as_an_excerpt(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A 256 KB response is usable by the flow, but its stored excerpt is a few KB."""
    root = write_project(
        {
            "f": """
            name: f
            steps:
              - id: get
                http: {url: "@BASE@/huge?kb=256"}
            outputs:
              size: ${{ steps.get.body | length }}
            """
        }
    )
    runtime = open_runtime(root)
    record = await runtime.engine.run("f")
    assert record.status == "succeeded", record.error
    assert record.outputs == {"size": 256 * 1024}
    stored = runtime.history.get_run(record.id)
    assert stored is not None and stored.steps[0].response is not None
    excerpt = stored.steps[0].response["body"]
    assert len(excerpt) < 4200
    assert excerpt.endswith(f"... ({256 * 1024} characters)")


async def test_expression_error_at_run_time_fails_the_step_only_this_run(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """An expression that cannot be evaluated fails its step with the expression in the
    message; the engine keeps running other runs."""
    root = write_project(
        {
            "f": """
            name: f
            steps:
              - id: a
                http: {url: "@BASE@/echo"}
              - id: b
                set: {deep: "${{ steps.a.body.missing.deeper }}"}
            """,
            "g": """
            name: g
            steps:
              - id: ok
                set: {x: 1}
            """,
        }
    )
    runtime = open_runtime(root)
    record = await runtime.engine.run("f")
    assert record.status == "failed"
    assert record.error == (
        "step b: ${{ steps.a.body.missing.deeper }}: steps.a.body has no 'missing'"
    )
    assert [(s.path, s.status) for s in record.steps] == [("a", "succeeded"), ("b", "failed")]
    other, again = await asyncio.gather(runtime.engine.run("g"), runtime.engine.run("f"))
    assert other.status == "succeeded"
    assert again.status == "failed"


async def test_jinja_error_at_run_time_names_the_expression(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """An error inside a Jinja expression (a division by zero) names the expression."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        inputs:
          n: {type: integer, default: 0}
        steps:
          - id: calc
            set: {ratio: "${{ 10 / inputs.n }}"}
        """,
    )
    assert record.status == "failed"
    assert record.error == ("step calc: ${{ 10 / inputs.n }}: ZeroDivisionError: division by zero")
