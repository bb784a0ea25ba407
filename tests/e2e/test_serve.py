"""``flowrunner serve`` as an operator runs it: a real process, killed or stopped under load.

Each test writes a project whose webhook flow calls a slow-ish upstream (a Starlette app
under uvicorn in a thread of the test process, on 127.0.0.1), starts
``python -m flowrunner serve --port <free>`` on it, and reads the state database directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

START_SECONDS = 30  # importing flowrunner takes a few seconds on a busy machine


class Upstream:
    """A slow endpoint that counts the markers it receives."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.markers: Counter[str] = Counter()
        self.url = ""

    def app(self) -> Starlette:
        async def slow(request: Request) -> JSONResponse:
            with self.lock:
                self.markers[request.query_params.get("m", "")] += 1
            await asyncio.sleep(float(request.query_params.get("delay", "0.2")))
            return JSONResponse({"ok": True})

        return Starlette(routes=[Route("/slow", slow)])

    def received(self) -> Counter[str]:
        with self.lock:
            return Counter(self.markers)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    state = Upstream()
    config = uvicorn.Config(
        state.app(), host="127.0.0.1", port=0, log_level="warning", lifespan="off", http="h11"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="upstream", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the upstream did not start"
        time.sleep(0.01)
    state.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Serve:
    """One ``flowrunner serve`` process; its output goes to a file."""

    def __init__(self, root: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = log.open("ab")
        env = dict(os.environ, FLOWRUNNER_SECRET_KEY="e2e-serve-key")
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, "-m", "flowrunner", "serve", "--port", str(self.port)],
            cwd=root,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert self.process.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"serve did not start:\n{self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, seconds: float) -> int:
        try:
            return self.process.wait(timeout=seconds)
        finally:
            self._out.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait(10)


@pytest.fixture
def processes() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.kill()


def intake_flow(upstream: Upstream, respond: str = "immediate") -> str:
    return f"""\
name: intake
concurrency: {{limit: 20}}
triggers:
  - webhook: {{path: intake, auth: none, respond: {respond}}}
steps:
  - id: call
    http: {{url: "{upstream.url}/slow?delay=0.3&m=${{{{ trigger.body.marker }}}}"}}
"""


def state_rows(root: Path, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(root / ".flowrunner" / "state.db", timeout=10) as conn:
        return list(conn.execute(query))


def wait_until_quiet(root: Path, seconds: float = 30) -> list[tuple[str, str, str]]:
    """(id, status, marker) of every run, once none is queued or running (bounded wait)."""
    deadline = time.monotonic() + seconds
    while True:
        queued = state_rows(root, "SELECT count(*) FROM run_queue")[0][0]
        runs = [
            (run_id, status, json.loads(trigger)["body"]["marker"])
            for run_id, status, trigger in state_rows(root, "SELECT id, status, trigger FROM runs")
        ]
        if queued == 0 and all(status not in ("queued", "running") for _, status, _ in runs):
            return runs
        assert time.monotonic() < deadline, f"not quiet: {queued} queued, runs {runs}"
        time.sleep(0.1)


async def fire(
    url: str, count: int, parallel: int, on_answer: Callable[[], None]
) -> dict[str, Any]:
    """``count`` webhooks, ``parallel`` at a time; marker → the answer's JSON or the error."""
    results: dict[str, Any] = {}
    gate = asyncio.Semaphore(parallel)
    limits = httpx.Limits(max_connections=parallel)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:

        async def one(marker: str) -> None:
            async with gate:
                try:
                    response = await client.post(f"{url}/hooks/intake", json={"marker": marker})
                except httpx.TransportError as exc:
                    results[marker] = exc
                    return
                results[marker] = (response.status_code, response.json())
                on_answer()

        await asyncio.gather(*(one(f"m-{n:03d}") for n in range(count)))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("respond", ["immediate", "wait"])
def test_a_killed_server_loses_no_accepted_webhook_and_runs_none_twice(
    make_project: Callable[..., Path], upstream: Upstream, processes: list[Serve], respond: str
) -> None:
    """SIGKILL in the middle of a burst of webhooks, then a restart: every webhook answered
    2xx has exactly one run (finished, or marked interrupted if it was cut short), no
    webhook has two, and the upstream never saw a marker twice. With ``respond: wait`` the
    answers come as runs end, and each run (0.3 s) outlasts the delay after which a run
    started before it was stored is written: those cut short are found interrupted too."""
    root = make_project({"intake": intake_flow(upstream, respond)})
    first = Serve(root, root / "serve-1.log")
    processes.append(first)
    answered = 0

    def count_and_maybe_kill() -> None:
        nonlocal answered
        answered += 1
        if answered == 25:
            os.kill(first.process.pid, signal.SIGKILL)

    results = asyncio.run(fire(first.url, 60, 8, count_and_maybe_kill))
    assert first.wait(10) == -signal.SIGKILL
    accepted = {
        marker: answer[1]["run_id"]
        for marker, answer in results.items()
        if isinstance(answer, tuple) and 200 <= answer[0] < 300
    }
    assert 25 <= len(accepted) < 60, results
    in_flight = left_running(root)
    second = Serve(root, root / "serve-2.log")
    processes.append(second)
    runs = wait_until_quiet(root)

    by_marker = Counter(marker for _, _, marker in runs)
    assert max(by_marker.values()) == 1, by_marker.most_common(3)
    run_of = {marker: (run_id, status) for run_id, status, marker in runs}
    for marker, run_id in accepted.items():
        assert marker in run_of, f"{marker} was answered 2xx and never ran"
        assert run_of[marker][0] == run_id
    statuses = Counter(status for _, status, _ in runs)
    assert set(statuses) <= {"succeeded", "interrupted"}, statuses
    assert statuses["interrupted"] == in_flight
    assert max(upstream.received().values()) == 1
    second.process.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0


def left_running(root: Path) -> int:
    """Runs a killed server left in flight (what the next start marks interrupted): intake
    rows claimed by it whose run has not finished (a short run's history is written only
    when it ends, so it may have no row yet)."""
    query = (
        "SELECT count(*) FROM run_queue q LEFT JOIN runs r ON r.id = q.id "
        "WHERE q.status = 'running' AND (r.id IS NULL OR r.status = 'running')"
    )
    return int(state_rows(root, query)[0][0])


def slow_wait_flow(upstream: Upstream) -> str:
    return f"""\
name: patient
concurrency: {{limit: 5}}
triggers:
  - webhook: {{path: patient, auth: none, respond: wait}}
steps:
  - id: note
    log: "patient ${{{{ trigger.body.marker }}}}"
  - id: call
    http: {{url: "{upstream.url}/slow?delay=1.5&m=${{{{ trigger.body.marker }}}}"}}
"""


@pytest.mark.slow
def test_sigterm_stops_intake_finishes_runs_in_flight_and_exits_0(
    make_project: Callable[..., Path], upstream: Upstream, processes: list[Serve]
) -> None:
    """On SIGTERM the server stops accepting connections, lets the runs in flight finish
    (their callers get their answers), and exits 0; its JSON log lines of a run carry the
    run id and the flow."""
    root = make_project({"patient": slow_wait_flow(upstream)})
    serve = Serve(root, root / "serve.log")
    processes.append(serve)
    answers: dict[str, httpx.Response] = {}

    def call(marker: str) -> None:
        answers[marker] = httpx.post(
            f"{serve.url}/hooks/patient", json={"marker": marker}, timeout=30
        )

    callers = [threading.Thread(target=call, args=(f"t-{n}",)) for n in range(3)]
    for caller in callers:
        caller.start()
    deadline = time.monotonic() + 10
    while sum(upstream.received().values()) < 3:
        assert time.monotonic() < deadline, "the runs did not start"
        time.sleep(0.02)
    serve.process.send_signal(signal.SIGTERM)
    refused = False
    deadline = time.monotonic() + 1.2  # the runs in flight need 1.5 s more
    while not refused and time.monotonic() < deadline:
        try:
            httpx.get(f"{serve.url}/healthz", timeout=1)
        except httpx.TransportError:
            refused = True
        time.sleep(0.05)
    assert refused, "the server still accepted connections after SIGTERM"
    for caller in callers:
        caller.join(timeout=20)
    assert serve.wait(30) == 0, serve.output()

    assert sorted(answers) == ["t-0", "t-1", "t-2"]
    assert all(a.status_code == 200 and a.json()["status"] == "succeeded" for a in answers.values())
    runs = wait_until_quiet(root, seconds=1)
    assert sorted((status, marker) for _, status, marker in runs) == [
        ("succeeded", "t-0"),
        ("succeeded", "t-1"),
        ("succeeded", "t-2"),
    ]
    lines = [json.loads(line) for line in serve.output().splitlines() if line.startswith("{")]
    run_ids = {a.json()["run_id"]: m for m, a in answers.items()}
    logged = {x["run_id"]: x for x in lines if x["message"].startswith("patient ")}
    assert sorted(logged) == sorted(run_ids)
    for run_id, line in logged.items():
        assert line["flow"] == "patient"
        assert line["message"] == f"patient {run_ids[run_id]}"
