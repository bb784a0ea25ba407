"""History retention: finished runs and delivered notifications older than
``history.keep`` are removed (by the server's housekeeping, or ``flowrunner runs prune``);
runs still going, pending and failed notifications are kept."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from serving import ServeFactory, ServerPool
from sqlalchemy import event, insert, select
from typer.testing import CliRunner

from flowrunner.app import database_url
from flowrunner.cli import app
from flowrunner.loader import load_project
from flowrunner.store.database import Database
from flowrunner.store.notifications import NotificationStore
from flowrunner.store.runs import RunHistory, RunRecord, finished_rows
from flowrunner.store.schema import run_steps, runs

NOW = datetime.now(UTC)
FLOW = """
name: note
steps:
  - id: note
    set: {n: 1}
"""


def _run(run_id: str, age: timedelta, status: str = "succeeded") -> RunRecord:
    started = NOW - age
    finished = None if status == "running" else started + timedelta(seconds=1)
    return RunRecord(run_id, "note", status, {}, {}, started, finished)


def _fill(database: Database) -> None:
    """Old runs (finished in three ways, one still running, one written before schema 5
    with its steps in run_steps) and a recent one."""
    history = RunHistory(database)
    for run_id, status in (("old-ok", "succeeded"), ("old-bad", "failed")):
        history.record(_run(run_id, timedelta(days=40), status))
    history.record(_run("old-cut", timedelta(days=31), "interrupted"))
    history.record_started(_run("old-going", timedelta(days=40), "running"))
    history.record(_run("new-ok", timedelta(days=2)))
    with database.engine.begin() as conn:
        conn.execute(
            insert(runs).values(
                id="old-v4",
                flow="note",
                status="succeeded",
                trigger={},
                inputs={},
                started_at=NOW - timedelta(days=90),
                finished_at=NOW - timedelta(days=90),
            )
        )
        conn.execute(
            insert(run_steps).values(
                run_id="old-v4",
                seq=0,
                path="note",
                kind="set",
                status="succeeded",
                started_at=NOW - timedelta(days=90),
                duration_ms=1.0,
            )
        )


def _run_ids(database: Database) -> set[str]:
    with database.engine.connect() as conn:
        return set(conn.execute(select(runs.c.id)).scalars())


def test_prune_removes_finished_runs_started_before_the_cutoff(tmp_path: Path) -> None:
    """Runs that finished (however they ended) and started before the cutoff are removed,
    in short transactions (the first takes two runs), with the steps an older schema kept
    apart; a run still going and a recent one stay, and a second prune finds nothing. A
    prune told to stop removes nothing more."""
    database = Database.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        _fill(database)
        history = RunHistory(database)
        stopped = threading.Event()
        stopped.set()
        assert history.prune(NOW - timedelta(days=30), stopped) == 0  # told to stop first
        assert history.prune(NOW - timedelta(days=30), first_batch=2) == 4
        assert _run_ids(database) == {"old-going", "new-ok"}
        with database.engine.connect() as conn:
            assert conn.execute(select(run_steps)).fetchall() == []
        assert history.prune(NOW - timedelta(days=30)) == 0
        assert history.get_run("new-ok") is not None
    finally:
        database.close()


def test_prune_keeps_pending_and_failed_notifications(tmp_path: Path) -> None:
    """Of the outbox, only notifications delivered before the cutoff go: one waiting to be
    sent, one whose delivery failed (however old) and a recent delivery stay."""
    database = Database.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        store = NotificationStore(database)
        old = NOW - timedelta(days=40)
        ids = [store.enqueue("log", "t", f"s{i}", "b", [], old) for i in range(4)]
        store.delivered(ids[0], old)
        store.delivered(ids[1], NOW)
        store.failed(store.due(NOW)[0], "refused", old)  # ids[2] after the two above
        assert store.prune_sent(NOW - timedelta(days=30)) == 1
        assert sorted(item.id for item in store.all()) == ids[1:]
    finally:
        database.close()


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    async with ServerPool() as pool:
        yield pool.start


@pytest.mark.parametrize(("settings", "left"), [("", 2), ("history: {keep: null}\n", 6)])
async def test_the_server_prunes_as_part_of_its_housekeeping(
    make_project: Callable[..., Path], serve: ServeFactory, settings: str, left: int
) -> None:
    """At start (and every reminders.check_every) the server removes what history.keep (30
    days by default) no longer keeps; with `keep: null` it removes nothing."""
    root = make_project({"note": FLOW}, settings=settings)
    database = Database.open(database_url(load_project(root)))
    _fill(database)
    database.close()
    served = await serve(root)
    await served.server.prune()  # as housekeeping does; its start-up run may still be going
    assert len(served.runs()) == left
    if left == 2:
        assert {run.id for run in served.runs()} == {"old-going", "new-ok"}


def test_runs_prune_from_the_command_line(make_project: Callable[..., Path]) -> None:
    """`flowrunner runs prune` removes what history.keep does not keep, or what is older
    than --older-than; a value that is not a duration is refused with exit 2."""
    root = make_project({"note": FLOW})
    database = Database.open(database_url(load_project(root)))
    _fill(database)
    database.close()
    runner = CliRunner()
    bad = runner.invoke(app, ["runs", "prune", "--older-than", "soon", "--project", str(root)])
    assert bad.exit_code == 2
    assert "not a duration" in bad.output
    pruned = runner.invoke(app, ["runs", "prune", "--older-than", "35d", "--project", str(root)])
    assert pruned.exit_code == 0, pruned.output
    assert "removed 3 run(s)" in pruned.output
    pruned = runner.invoke(app, ["runs", "prune", "--project", str(root)])
    assert "removed 1 run(s)" in pruned.output
    listed = runner.invoke(app, ["runs", "list", "--project", str(root)])
    assert "old-goin" in listed.output and "new-ok" in listed.output
    assert "old-ok" not in listed.output


async def test_a_server_stopping_during_a_prune_ends_it_cleanly(
    make_project: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped while its start-up prune is going, the server ends the prune between two
    transactions and closes the database after it: no error, every run either kept or
    removed whole."""
    root = make_project({"note": FLOW})
    database = Database.open(database_url(load_project(root)))
    old = [_run(f"old-{index:05d}", timedelta(days=40, seconds=index)) for index in range(20_000)]
    database.writes.write_now([row for run in old for row in finished_rows(run, False)])
    database.close()
    async with ServerPool() as pool:
        served = await pool.start(root)
        history = served.server.runtime.history
        await served.until(lambda: history.get_run("old-19999", exact=True) is None)
        await served.stop()
    assert "pruning the history failed" not in caplog.text
    database = Database.open(database_url(load_project(root)))
    try:
        left = _run_ids(database)
        assert 0 < len(left) < 20_000  # stopped part way
        assert {f"old-{index:05d}" for index in range(len(left))} == left  # oldest first
    finally:
        database.close()


def test_prune_needs_no_parameter_per_run(tmp_path: Path) -> None:
    """A batch of thousands of runs is deleted even where SQLite takes at most 999 query
    parameters (its limit before 3.32): the runs are chosen by a subquery."""
    database = Database.open(f"sqlite:///{tmp_path / 'state.db'}")

    @event.listens_for(database.engine, "connect")
    def old_limit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    database.engine.dispose()  # connections made from now on have the old limit
    try:
        old = [_run(f"old-{i:05d}", timedelta(days=40, seconds=i)) for i in range(3000)]
        database.writes.write_now([row for run in old for row in finished_rows(run, False)])
        assert RunHistory(database).prune(NOW - timedelta(days=30), first_batch=1500) == 3000
        assert _run_ids(database) == set()
    finally:
        database.close()
