"""The dispatcher behind ``flowrunner serve``: concurrency limits, restarts after a stop or
a crash, and the server's own endpoints (metrics, health, the admin token, JSON logs).

Servers run in-process (``serving.ServerPool``), their flows call the real upstream
server of ``conftest.upstream``; ``/slow`` keeps a run busy for a known time, so that
overlaps can be read from the run history's start and finish times.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import Served, ServeFactory, ServerPool
from upstream_server import Upstream

from flowrunner.errors import ConfigurationError
from flowrunner.logs import JsonFormatter
from flowrunner.server import build_server
from flowrunner.store.queue import QueuedRun
from flowrunner.store.runs import RunRecord

ProjectWriter = Callable[..., Path]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    """Start servers on project directories; all are stopped at teardown."""
    async with ServerPool() as pool:

        async def start(root: Path, **kwargs: Any) -> Served:
            served = await pool.start(root, **kwargs)
            assert served.server.problems == [], [p.format() for p in served.server.problems]
            return served

        yield start


def busy_flow(name: str, concurrency: str, delay: float = 0.2) -> str:
    """A webhook flow that holds the upstream for ``delay`` seconds, then reports its n."""
    return f"""
        name: {name}
        concurrency: {concurrency}
        triggers:
          - webhook: {{path: {name}, auth: none}}
        steps:
          - id: hold
            http: {{url: "@BASE@/slow?delay={delay}&key=@KEY@"}}
          - id: report
            http: {{url: "@BASE@/echo?key=@KEY@-{name}&n=${{{{ trigger.body.n }}}}"}}
    """


def max_overlap(runs: list[RunRecord]) -> int:
    """The largest number of runs in flight at one instant, from their start/finish times."""
    edges: list[tuple[datetime, int]] = []
    for run in runs:
        assert run.finished_at is not None
        edges += [(run.started_at, 1), (run.finished_at, -1)]
    in_flight = peak = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):  # ends before starts
        in_flight += step
        peak = max(peak, in_flight)
    return peak


async def post_all(served: Served, path: str, count: int) -> list[httpx.Response]:
    """``count`` webhooks with n = 0..count-1, sent one after the other."""
    return [await served.client.post(f"/hooks/{path}", json={"n": n}) for n in range(count)]


# ---------------------------------------------------------------- concurrency


async def test_limit_one_with_queue_runs_one_at_a_time_in_arrival_order(
    write_project: ProjectWriter, upstream: Upstream, serve: ServeFactory
) -> None:
    """`limit: 1, when_busy: queue`: runs wait their turn, start in arrival order, and never
    overlap."""
    key = upstream.key()
    served = await serve(
        write_project({"serial": busy_flow("serial", "{limit: 1, when_busy: queue}")}, KEY=key)
    )
    answers = await post_all(served, "serial", 4)
    assert [a.status_code for a in answers] == [202] * 4
    ids = [a.json()["run_id"] for a in answers]
    await served.until(lambda: served.server.runtime.history.get_run(ids[0]) is not None)
    waiting = await served.client.get(f"/runs/{ids[-1]}")
    assert waiting.json()["status"] == "queued"
    runs = await served.quiet()
    by_start = sorted(runs, key=lambda r: r.started_at)
    assert [r.id for r in by_start] == ids
    assert all(r.status == "succeeded" for r in runs)
    assert max_overlap(runs) == 1
    reported = [r["url"].rsplit("n=", 1)[1] for r in upstream.state.requests(f"{key}-serial")]
    assert reported == ["0", "1", "2", "3"]


async def test_limit_two_runs_two_at_a_time(
    write_project: ProjectWriter, upstream: Upstream, serve: ServeFactory
) -> None:
    """`limit: 2` lets two runs of a flow overlap, never three."""
    root = write_project({"pair": busy_flow("pair", "{limit: 2}")}, KEY=upstream.key())
    served = await serve(root)
    await post_all(served, "pair", 5)
    runs = await served.quiet()
    assert len(runs) == 5
    assert max_overlap(runs) == 2


async def test_skip_when_busy_records_a_skipped_run(
    write_project: ProjectWriter, upstream: Upstream, serve: ServeFactory
) -> None:
    """`when_busy: skip`: a webhook that arrives while the flow is busy, even before the first
    run has started, answers 200 with status skipped and leaves a skipped run; once the flow
    is idle again, webhooks run."""
    root = write_project({"lone": busy_flow("lone", "{limit: 1, when_busy: skip}")}, KEY="s")
    served = await serve(root, paused=True)
    first = await served.client.post("/hooks/lone", json={"n": 0})
    second = await served.client.post("/hooks/lone", json={"n": 1})
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["status"] == "skipped"
    assert "busy" in second.json()["reason"]
    skipped = served.run(second.json()["run_id"])
    assert skipped.status == "skipped"
    assert skipped.error == second.json()["reason"]
    assert skipped.trigger["body"] == {"n": 1}
    served.resume()
    await served.until(lambda: served.server.dispatcher.in_flight == 1)
    third = await served.client.post("/hooks/lone", json={"n": 2})
    assert third.json()["status"] == "skipped"
    await served.quiet()
    fourth = await served.client.post("/hooks/lone", json={"n": 3})
    assert fourth.status_code == 202
    runs = {r.trigger["body"]["n"]: r.status for r in await served.quiet()}
    assert runs == {0: "succeeded", 1: "skipped", 2: "skipped", 3: "succeeded"}


async def test_fail_when_busy_answers_409_and_records_a_failed_run(
    write_project: ProjectWriter, upstream: Upstream, serve: ServeFactory
) -> None:
    """`when_busy: fail`: a webhook that arrives while the flow is busy answers 409 and leaves
    a failed run that says why."""
    root = write_project({"strict": busy_flow("strict", "{limit: 1, when_busy: fail}")}, KEY="f")
    served = await serve(root)
    first = await served.client.post("/hooks/strict", json={"n": 0})
    second = await served.client.post("/hooks/strict", json={"n": 1})
    assert first.status_code == 202
    assert second.status_code == 409
    assert second.json()["status"] == "failed"
    failed = served.run(second.json()["run_id"])
    assert failed.status == "failed"
    assert "busy" in (failed.error or "")
    statuses = sorted(r.status for r in await served.quiet())
    assert statuses == ["failed", "succeeded"]


async def test_the_global_limit_holds_across_flows(
    make_project: Callable[..., Path], upstream: Upstream, serve: ServeFactory
) -> None:
    """`server.max_runs_in_flight` in flowrunner.yaml caps runs in flight across all flows,
    whatever the flows' own limits."""
    key = upstream.key()
    flows = {
        name: busy_flow(name, "{limit: 5}")
        .replace("@BASE@", upstream.base_url)
        .replace("@KEY@", key)
        for name in ("north", "south", "east")
    }
    root = make_project(flows, settings="server: {max_runs_in_flight: 2}\n")
    served = await serve(root)
    assert served.server.dispatcher.max_in_flight == 2
    peak = 0

    def sample() -> bool:
        nonlocal peak
        peak = max(peak, served.server.dispatcher.in_flight)
        return False

    sampler = asyncio.create_task(served.until(sample, seconds=30))
    for name in flows:
        await post_all(served, name, 2)
    runs = await served.quiet()
    sampler.cancel()
    assert len(runs) == 6 and all(r.status == "succeeded" for r in runs)
    assert max_overlap(runs) == 2
    assert peak == 2


# ---------------------------------------------------------------- restarts

RESTART_FLOWS = {
    "keep": """
        name: keep
        concurrency: {limit: 10}
        triggers:
          - webhook: {path: keep, auth: none}
        steps:
          - id: hold
            http: {url: "@BASE@/slow?delay=@DELAY@&key=@KEY@-keep"}
    """,
    "again": """
        name: again
        on_interrupt: restart
        concurrency: {limit: 10}
        triggers:
          - webhook: {path: again, auth: none}
        steps:
          - id: hold
            http: {url: "@BASE@/slow?delay=@DELAY@&key=@KEY@-again"}
    """,
}


@pytest.fixture
def restart_project(write_project: ProjectWriter, upstream: Upstream) -> Iterator[Path]:
    yield write_project(RESTART_FLOWS, KEY=upstream.key(), DELAY="0.05")


async def test_runs_queued_when_the_server_stopped_start_on_the_next_start(
    restart_project: Path, serve: ServeFactory
) -> None:
    """Webhooks accepted while the dispatcher started nothing are still queued after a stop,
    and run, once each, when a new server starts on the same state."""
    first = await serve(restart_project, paused=True)
    ids = [(await first.client.post("/hooks/keep", json={"n": n})).json()["run_id"] for n in (1, 2)]
    await first.stop()
    second = await serve(restart_project)
    runs = await second.quiet()
    assert sorted(r.id for r in runs) == sorted(ids)
    assert all(r.status == "succeeded" for r in runs)


def leave_in_flight(root: Path, flow: str, status: str | None = "running") -> str:
    """What a process killed mid-run leaves behind: a claimed intake row and a run record
    in ``status`` (None: no record yet, as for a run killed in its first moments).
    Returns the run id."""
    server = build_server(root)
    queue, history = server.dispatcher.queue, server.runtime.history
    now = datetime.now(UTC)
    trigger = {"kind": "webhook", "body": {"marker": flow}, "headers": {}, "query": {}}
    run = QueuedRun(str(uuid.uuid4()), flow, trigger, {}, None, now)
    queue.enqueue_now(run)
    assert queue.claim(run.id)
    if status is None:
        server.runtime.database.close()
        return run.id
    history.record_started(RunRecord(run.id, flow, "running", trigger, {}, now))
    if status != "running":
        history.record_finished(RunRecord(run.id, flow, status, trigger, {}, now, now))
    server.runtime.database.close()
    return run.id


async def test_runs_cut_short_by_a_crash_are_marked_interrupted_or_restarted(
    restart_project: Path, serve: ServeFactory, upstream: Upstream
) -> None:
    """After a crash, a run that was in flight is marked interrupted; a flow with
    `on_interrupt: restart` runs it again from the start, once, with the same trigger."""
    kept = leave_in_flight(restart_project, "keep")
    redone = leave_in_flight(restart_project, "again")
    served = await serve(restart_project)
    runs = await served.quiet()
    assert len(runs) == 3
    assert served.run(kept).status == "interrupted"
    assert "stopped while this run was in flight" in (served.run(kept).error or "")
    assert served.run(redone).status == "interrupted"
    (restarted,) = [r for r in runs if r.id not in (kept, redone)]
    assert (restarted.flow, restarted.status) == ("again", "succeeded")
    assert restarted.trigger["body"] == {"marker": "again"}
    assert served.table("run_queue") == []


async def test_a_run_killed_before_its_history_was_written_is_interrupted(
    restart_project: Path, serve: ServeFactory
) -> None:
    """A claimed intake row is a run that had started, even with no history yet (a run's
    start is written only once it lasts): it is marked interrupted with its trigger, never
    silently run a second time; `on_interrupt: restart` starts it again, once."""
    kept = leave_in_flight(restart_project, "keep", status=None)
    redone = leave_in_flight(restart_project, "again", status=None)
    served = await serve(restart_project)
    runs = await served.quiet()
    assert len(runs) == 3
    for run_id, flow in ((kept, "keep"), (redone, "again")):
        record = served.run(run_id)
        assert (record.flow, record.status) == (flow, "interrupted")
        assert record.trigger["body"] == {"marker": flow}
        assert "stopped while this run was in flight" in (record.error or "")
    (restarted,) = [r for r in runs if r.id not in (kept, redone)]
    assert (restarted.flow, restarted.status) == ("again", "succeeded")
    assert served.table("run_queue") == []


async def test_a_run_that_finished_just_before_a_crash_is_left_as_it_was(
    restart_project: Path, serve: ServeFactory
) -> None:
    """A run recorded as finished whose intake row was still there when the process died is
    neither marked interrupted nor run again."""
    done = leave_in_flight(restart_project, "again", status="succeeded")
    served = await serve(restart_project)
    await asyncio.sleep(0.1)
    runs = await served.quiet()
    assert [(r.id, r.status) for r in runs] == [(done, "succeeded")]
    assert served.table("run_queue") == []


async def test_waiting_for_a_finished_run_whose_intake_row_remains_answers_at_once(
    restart_project: Path, serve: ServeFactory
) -> None:
    """A run recorded outside the engine (refused at start, say) has its intake row removed
    a moment after its history is written; a `respond: wait` webhook (a duplicate, say)
    that asks in between gets the finished run, not a wait until its timeout."""
    served = await serve(restart_project, paused=True)
    queue, history = served.server.dispatcher.queue, served.server.runtime.history
    now = datetime.now(UTC)
    run = QueuedRun(str(uuid.uuid4()), "keep", {"kind": "webhook"}, {}, None, now)
    queue.enqueue_now(run)
    assert queue.claim(run.id)
    history.record(RunRecord(run.id, "keep", "succeeded", {}, {}, now, now))
    started = time.monotonic()
    record = await served.server.dispatcher.wait_for(run.id, 5)
    assert record is not None and record.status == "succeeded"
    assert time.monotonic() - started < 1


async def test_a_stop_that_outlasts_the_grace_marks_runs_interrupted(
    write_project: ProjectWriter, upstream: Upstream, serve: ServeFactory
) -> None:
    """A stop that cancels runs still in flight after the grace period marks them interrupted
    at once; the next start restarts those whose flow asks for it."""
    key = upstream.key()
    root = write_project(RESTART_FLOWS, KEY=key, DELAY="5")
    first = await serve(root)
    kept = (await first.client.post("/hooks/keep", json={})).json()["run_id"]
    redone = (await first.client.post("/hooks/again", json={})).json()["run_id"]
    await first.until(lambda: upstream.state.count(f"{key}-again") == 1)
    await first.until(lambda: upstream.state.count(f"{key}-keep") == 1)
    await first.stop(grace=0.1)
    assert first.run(kept).status == "interrupted"
    assert first.run(redone).status == "interrupted"
    for name in ("keep", "again"):  # the next version of the flows is quick
        text = (root / "flows" / f"{name}.yaml").read_text()
        (root / "flows" / f"{name}.yaml").write_text(text.replace("delay=5", "delay=0.05"))
    second = await serve(root)
    runs = await second.quiet()
    assert len(runs) == 3
    assert sorted(r.status for r in runs) == ["interrupted", "interrupted", "succeeded"]
    assert upstream.state.count(f"{key}-keep") == 1
    assert upstream.state.count(f"{key}-again") == 2


# ---------------------------------------------------------------- the server's own endpoints

SURFACE_FLOWS = {
    "fetch": """
        name: fetch
        triggers:
          - webhook: {path: fetch, auth: none, respond: wait}
        steps:
          - id: get
            http: {url: "@BASE@/echo?key=@KEY@"}
          - id: note
            log: "fetched for ${{ trigger.body.who }}"
    """,
    "refuse": """
        name: refuse
        triggers:
          - webhook: {path: refuse, auth: none, respond: wait}
        steps:
          - id: stop
            fail: "refused ${{ trigger.body.who }}"
    """,
    "lone": """
        name: lone
        concurrency: {limit: 1, when_busy: skip}
        triggers:
          - webhook: {path: lone, auth: none}
        steps:
          - id: note
            log: "lone ${{ trigger.body.who }}"
    """,
}


async def test_metrics_count_runs_steps_and_the_queue(
    write_project: ProjectWriter, upstream: Upstream, serve: ServeFactory
) -> None:
    """/metrics exposes finished runs by flow and status (skipped ones included), step
    durations by kind, and the queue depth."""
    served = await serve(write_project(SURFACE_FLOWS, KEY=upstream.key()))
    for who in ("ada", "alan"):
        assert (await served.client.post("/hooks/fetch", json={"who": who})).status_code == 200
    assert (await served.client.post("/hooks/refuse", json={"who": "x"})).status_code == 500
    served.pause()
    queued = [await served.client.post("/hooks/lone", json={"who": w}) for w in "yz"]
    assert [q.json()["status"] for q in queued] == ["queued", "skipped"]
    lines = set((await served.client.get("/metrics")).text.splitlines())
    assert 'flowrunner_runs_total{flow="fetch",status="succeeded"} 2' in lines
    assert 'flowrunner_runs_total{flow="refuse",status="failed"} 1' in lines
    assert 'flowrunner_runs_total{flow="lone",status="skipped"} 1' in lines
    assert 'flowrunner_step_duration_seconds_count{kind="http"} 2' in lines
    assert 'flowrunner_step_duration_seconds_count{kind="log"} 2' in lines
    http_sum = next(
        x for x in lines if x.startswith('flowrunner_step_duration_seconds_sum{kind="http')
    )
    assert float(http_sum.rsplit(" ", 1)[1]) > 0
    assert "flowrunner_queue_depth 1" in lines
    assert "flowrunner_runs_in_flight 0" in lines
    assert "# TYPE flowrunner_runs_total counter" in lines
    # Stored: the queued run's intake, the skipped run recorded at intake, and for each
    # of the 3 runs that ran either its intake, its end and the removal of its intake row,
    # or (if it ended before its intake row was handed off) its end alone.
    writes = next(x for x in lines if x.startswith("flowrunner_state_writes "))
    assert float(writes.split()[1]) in (5, 7, 9, 11)
    commits = next(x for x in lines if x.startswith("flowrunner_state_commits "))
    assert 1 <= float(commits.split()[1]) <= 8  # a run's end and its removal: one commit


async def test_healthz_reports_flows_and_problems(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """/healthz answers 200 with the number of flows and of problems."""
    flow = "name: ok\nsteps:\n  - id: a\n    log: hi\n"
    served = await serve(make_project({"ok": flow}))
    response = await served.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "flows": 1, "problems": 0}


def test_a_public_address_needs_an_admin_token(make_project: Callable[..., Path]) -> None:
    """Binding beyond loopback without `server.admin_token` refuses to start."""
    root = make_project({"ok": "name: ok\nsteps:\n  - id: a\n    log: hi\n"})
    with pytest.raises(ConfigurationError, match="server.admin_token"):
        build_server(root, host="0.0.0.0")
    with pytest.raises(ConfigurationError):
        build_server(root, host="192.168.1.20")


async def test_with_an_admin_token_only_hooks_and_healthz_are_open(
    write_project: ProjectWriter, upstream: Upstream, serve: ServeFactory
) -> None:
    """Bound beyond loopback with an admin token, every endpoint but /hooks and /healthz
    needs `Authorization: Bearer <token>`."""
    root = write_project(SURFACE_FLOWS, KEY=upstream.key())
    (root / "flowrunner.yaml").write_text("server: {admin_token: adm1n-t0ken-xyz}\n")
    served = await serve(root, host="0.0.0.0")
    client = served.client
    hook = await client.post("/hooks/fetch", json={"who": "ada"})
    assert hook.status_code == 200
    assert (await client.get("/healthz")).status_code == 200
    run_path = f"/runs/{hook.json()['run_id']}"
    for path in ("/status", "/metrics", run_path):
        refused = await client.get(path)
        assert refused.status_code == 401, path
        assert refused.json() == {"error": "the admin token is required"}
        wrong = await client.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
    good = {"Authorization": "Bearer adm1n-t0ken-xyz"}
    assert (await client.get("/status", headers=good)).status_code == 200
    assert (await client.get("/metrics", headers=good)).status_code == 200


async def test_loopback_needs_no_admin_token(
    write_project: ProjectWriter, upstream: Upstream, serve: ServeFactory
) -> None:
    """On loopback the admin endpoints stay open, even with an admin token configured."""
    root = write_project(SURFACE_FLOWS, KEY=upstream.key())
    (root / "flowrunner.yaml").write_text("server: {admin_token: adm1n-t0ken-xyz}\n")
    served = await serve(root)
    assert (await served.client.get("/status")).status_code == 200


class Lines(logging.Handler):
    """Formats every record as flowrunner's JSON log lines do, while it is emitted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    handler = Lines()
    root, httpx_logger = logging.getLogger(), logging.getLogger("httpx")
    levels = root.level, httpx_logger.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    httpx_logger.setLevel(logging.INFO)  # a library's line, emitted inside the run
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        httpx_logger.setLevel(levels[1])


FETCH_AS_SERVICE = {
    "fetch-as-service": """
        name: fetch-as-service
        triggers:
          - webhook: {path: fetch-as-service, auth: none, respond: wait}
        steps:
          - id: get
            http: {url: "/echo?key=@KEY@", auth: svc}
          - id: note
            log: "fetched for ${{ trigger.body.who }}"
    """
}
SERVICE_PROFILE = {
    "svc": """
        name: svc
        kind: oauth2
        grant: client_credentials
        base_url: @BASE@
        token_url: @BASE@/oauth/token
        client_id: surface
        client_secret: ${{ secrets.SURFACE_CLIENT_SECRET }}
    """
}


async def test_json_log_lines_of_a_run_carry_its_id_and_flow(
    write_project: ProjectWriter,
    upstream: Upstream,
    serve: ServeFactory,
    json_lines: Lines,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Log lines emitted while a run executes (its log step, a library's request line) carry
    the run id and the flow; lines outside runs carry neither. The library line is httpx's,
    for the token endpoint call the run makes (through httpx's client; the step's own request
    goes through the wire directly, which logs none)."""
    monkeypatch.setenv("SURFACE_CLIENT_SECRET", "surface-client-secret-7c1f")
    flow = "fetch-as-service"
    root = write_project({**SURFACE_FLOWS, **FETCH_AS_SERVICE}, SERVICE_PROFILE, KEY=upstream.key())
    served = await serve(root)
    response = await served.client.post(f"/hooks/{flow}", json={"who": "grace"})
    run_id = served.runs(flow)[0].id
    assert response.status_code == 200, response.text
    step_line = next(x for x in json_lines.lines if x["message"] == "fetched for grace")
    assert (step_line["run_id"], step_line["flow"]) == (run_id, flow)
    request_line = next(
        x for x in json_lines.lines if x["logger"] == "httpx" and "/oauth/token" in x["message"]
    )
    assert (request_line["run_id"], request_line["flow"]) == (run_id, flow)
    serving_line = next(x for x in json_lines.lines if x["message"].startswith("serving "))
    assert "run_id" not in serving_line
    assert all(x.get("run_id") in (None, run_id) for x in json_lines.lines)


async def test_status_lists_flows_webhooks_and_next_fires(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """/status lists each flow with its webhooks and next schedule fires."""
    flow = """
        name: tick
        triggers:
          - schedule: {cron: "0 7 * * *", timezone: Europe/Paris, catch_up: none}
          - webhook: {path: tick, auth: none}
        steps:
          - id: a
            log: hi
    """
    served = await serve(make_project({"tick": flow}))
    status = (await served.client.get("/status")).json()
    tick = status["flows"]["tick"]
    assert tick["webhooks"] == ["/hooks/tick"]
    assert len(tick["next_fires"]) == 3
    assert all("T07:00:00+0" in t for t in tick["next_fires"])
    assert status["problems"] == [] and status["in_flight"] == 0
