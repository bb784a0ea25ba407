"""Run history in the state database: what a run leaves behind, read back."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from upstream_server import Upstream

from flowrunner.app import Runtime, build_runtime
from flowrunner.loader import load_project
from flowrunner.store.runs import RunRecord

ProjectWriter = Callable[..., Path]
RuntimeFactory = Callable[..., Runtime]

FLOWS = {
    "fetch": """
    name: fetch
    inputs:
      page: {type: integer, default: 0}
    steps:
      - id: get
        retry: {attempts: 3, backoff: fixed, delay: 10ms}
        http:
          url: @BASE@/flaky/@KEY@?fail=1
          query: {page: "${{ inputs.page }}"}
        outputs: {calls: $.calls}
      - id: note
        log: "fetched after ${{ steps.get.outputs.calls }} calls"
      - id: reply
        respond: {status: 200, json: {calls: "${{ steps.get.outputs.calls }}"}}
    outputs:
      calls: ${{ steps.get.outputs.calls }}
    """,
    "broken": """
    name: broken
    steps:
      - id: lookup
        on_error: continue
        http: {url: "@BASE@/echo?status=500"}
      - id: stop
        fail: "gave up: ${{ steps.lookup.status }}"
    """,
}


async def test_a_run_reads_back_as_it_was_recorded(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """get_run returns the run with its trigger, inputs, outputs, response and every step's
    request, response, attempts, outputs and message, in order."""
    root = write_project(FLOWS, KEY=upstream.key())
    runtime = open_runtime(root)
    trigger = {"kind": "manual", "body": {"a": 1}}
    record = await runtime.engine.run("fetch", inputs={"page": "2"}, trigger=trigger)
    assert record.status == "succeeded", record.error

    stored = runtime.history.get_run(record.id)
    assert stored is not None
    assert (stored.id, stored.flow, stored.status, stored.error) == (
        record.id,
        "fetch",
        "succeeded",
        None,
    )
    assert stored.trigger == trigger
    assert stored.inputs == {"page": "2"}
    assert stored.outputs == {"calls": 2}
    assert stored.response == {"status": 200, "headers": {}, "json": {"calls": 2}}
    assert stored.finished_at is not None and stored.finished_at >= stored.started_at
    assert [(s.seq, s.path, s.kind, s.status) for s in stored.steps] == [
        (0, "get", "http", "succeeded"),
        (1, "note", "log", "succeeded"),
        (2, "reply", "respond", "succeeded"),
    ]
    get = stored.steps[0]
    assert get.attempts == 2
    assert get.request is not None and get.response is not None
    assert get.request["method"] == "GET"
    assert get.request["url"].endswith("?fail=1&page=2")
    assert get.request["headers"]["user-agent"].startswith("flowrunner/")
    assert get.response["status"] == 200
    assert get.response["body"] == {"ok": True, "calls": 2, "method": "GET"}
    assert get.outputs == {"calls": 2}
    assert get.duration_ms > 0
    assert stored.steps[1].message == "fetched after 2 calls"
    assert stored.steps == record.steps  # what the engine returned is what was stored


async def test_the_row_holds_sql_nulls_and_plain_text(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """What another SQL client reads in the runs table: NULL where a run has no error,
    user or parent (not the text 'None'), and its status as plain text."""
    root = write_project(FLOWS, KEY=upstream.key())
    runtime = open_runtime(root)
    record = await runtime.engine.run("fetch", inputs={"page": "1"})
    path = runtime.database.engine.url.database
    assert path is not None
    with contextlib.closing(sqlite3.connect(path)) as connection:
        row = connection.execute(
            "SELECT typeof(error), typeof(user), typeof(parent_id), status, typeof(status) "
            "FROM runs WHERE id = ?",
            (record.id,),
        ).fetchone()
    assert row == ("null", "null", "null", "succeeded", "text")


async def test_failed_runs_keep_their_error_and_step_errors(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """A failed run is stored with its error; a continued step keeps its own error."""
    root = write_project(FLOWS, KEY=upstream.key())
    runtime = open_runtime(root)
    record = await runtime.engine.run("broken")
    stored = runtime.history.get_run(record.id)
    assert stored is not None
    assert (stored.status, stored.error) == ("failed", "gave up: 500")
    lookup, stop = stored.steps
    assert lookup.status == "continued"
    assert lookup.error is not None and "answered 500, expected 2xx" in lookup.error
    assert lookup.response is not None and lookup.response["status"] == 500
    assert (stop.status, stop.error) == ("failed", "gave up: 500")


async def test_list_runs_newest_first_by_flow_and_limit(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """list_runs gives runs newest first, optionally of one flow, at most `limit`."""
    root = write_project(FLOWS, KEY=upstream.key())
    runtime = open_runtime(root)
    ids = []
    for flow in ("broken", "fetch", "broken"):
        ids.append((await runtime.engine.run(flow)).id)
        await asyncio.sleep(0.002)  # distinct start times
    listed = runtime.history.list_runs()
    assert [r.id for r in listed] == ids[::-1]
    assert [r.status for r in listed] == ["failed", "succeeded", "failed"]
    assert [r.id for r in runtime.history.list_runs("broken")] == [ids[2], ids[0]]
    assert [r.id for r in runtime.history.list_runs(limit=1)] == [ids[2]]
    assert all(r.steps == [] for r in listed)  # listing does not load steps


async def test_get_run_by_prefix_and_unknown(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """A run is found by a prefix of its id (as the CLI shows it); an unknown id gives None."""
    root = write_project(FLOWS, KEY=upstream.key())
    runtime = open_runtime(root)
    record = await runtime.engine.run("broken")
    found = runtime.history.get_run(record.id[:8])
    assert found is not None and found.id == record.id
    assert runtime.history.get_run("does-not-exist") is None


async def test_history_survives_reopening_the_database(
    write_project: ProjectWriter, upstream: Upstream
) -> None:
    """A run written by one runtime is read back by another one opened later."""
    root = write_project(FLOWS, KEY=upstream.key())
    first = build_runtime(root, project=load_project(root))
    try:
        record = await first.engine.run("broken")
    finally:
        await first.aclose()
    second = build_runtime(root, project=load_project(root))
    try:
        stored = second.history.get_run(record.id)
    finally:
        await second.aclose()
    assert stored is not None and stored.status == "failed"
    assert len(stored.steps) == 2


async def test_times_read_back_as_utc(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """Start and finish times come back from SQLite as the aware UTC times recorded."""
    root = write_project(FLOWS, KEY=upstream.key())
    runtime = open_runtime(root)
    record = await runtime.engine.run("broken")
    stored = runtime.history.get_run(record.id)
    assert stored is not None
    assert stored.started_at == record.started_at
    assert stored.finished_at == record.finished_at
    assert stored.started_at.tzinfo is not None
    assert stored.steps[0].started_at == record.steps[0].started_at


async def test_mark_unfinished_marks_only_running_runs(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """Runs left 'running' by a dead process are marked; finished runs are not touched."""
    root = write_project(FLOWS, KEY=upstream.key())
    runtime = open_runtime(root)
    done = await runtime.engine.run("broken")
    started = datetime.now(UTC) - timedelta(minutes=5)
    for run_id in ("dead-1", "dead-2"):
        runtime.history.record_started(
            RunRecord(run_id, "fetch", "running", {}, {}, started_at=started)
        )
    assert runtime.history.mark_unfinished("interrupted") == 2
    assert runtime.history.mark_unfinished("interrupted") == 0
    statuses = {r.id: r.status for r in runtime.history.list_runs()}
    assert statuses == {"dead-1": "interrupted", "dead-2": "interrupted", done.id: "failed"}


async def test_delete_run_removes_its_steps(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """delete_run removes the run and its steps."""
    root = write_project(FLOWS, KEY=upstream.key())
    runtime = open_runtime(root)
    record = await runtime.engine.run("broken")
    runtime.history.delete_run(record.id)
    assert runtime.history.get_run(record.id) is None
    assert runtime.history.list_runs() == []


async def test_dry_run_is_not_recorded(write_project: ProjectWriter, upstream: Upstream) -> None:
    """A runtime built without history (the CLI's dry run) leaves no run behind."""
    key = upstream.key()
    root = write_project(FLOWS, KEY=key)
    runtime = build_runtime(root, project=load_project(root), keep_history=False)
    try:
        record = await runtime.engine.run("fetch", dry_run=True)
        assert record.status == "succeeded", record.error
        assert record.steps[0].request is not None
        assert runtime.history.list_runs() == []
    finally:
        await runtime.aclose()
    assert upstream.state.count(key) == 0


def test_runs_written_before_schema_5_keep_their_steps(tmp_path: Path) -> None:
    """Schema 5 moved a run's steps into its row. A database from before is brought
    forward on open: its old runs still read back with their steps, and new runs are
    written the new way."""
    from flowrunner.store.database import Database
    from flowrunner.store.runs import RunHistory, StepRecord

    url = f"sqlite:///{tmp_path / 'state.db'}"
    database = Database.open(url)
    with database.engine.begin() as conn:  # make it a version 4 database with one old run
        conn.exec_driver_sql("ALTER TABLE runs DROP COLUMN steps")
        conn.exec_driver_sql("UPDATE schema_version SET version = 4")
        conn.exec_driver_sql(
            'INSERT INTO runs (id, flow, status, "trigger", inputs, started_at) '
            "VALUES ('old-run', 'fetch', 'succeeded', '{}', '{}', '2026-01-02 03:04:05.000000')"
        )
        for seq, path in enumerate(["get", "note"]):
            conn.exec_driver_sql(
                "INSERT INTO run_steps (run_id, seq, path, kind, status, attempts, outputs, "
                "started_at, duration_ms) VALUES ('old-run', ?, ?, 'http', 'succeeded', 1, "
                "'{\"calls\": 2}', '2026-01-02 03:04:05.000000', 1.5)",
                (seq, path),
            )
    database.close()

    database = Database.open(url)
    history = RunHistory(database)
    old = history.get_run("old-run")
    assert old is not None
    assert [(s.seq, s.path, s.outputs) for s in old.steps] == [
        (0, "get", {"calls": 2}),
        (1, "note", {"calls": 2}),
    ]
    assert old.steps[0].started_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    now = datetime(2026, 2, 1, 8, 0, 0, 120000, tzinfo=UTC)
    new = RunRecord("new-run", "fetch", "succeeded", {}, {}, now, now)
    new.steps = [StepRecord(0, "get", "http", "succeeded", now, 2.0, attempts=1)]
    history.record(new)
    read = history.get_run("new-run")
    assert read is not None and read.steps == new.steps
    with database.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM run_steps").scalar_one() == 2
        assert conn.exec_driver_sql("SELECT version FROM schema_version").scalar_one() == 5
    database.close()
