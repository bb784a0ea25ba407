"""Group commit in the state store: writes submitted together share one transaction, a
bad write fails alone, and run history is written once for a short run."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, DateTime, event

from flowrunner.events import EventBus, RunEvent
from flowrunner.history import HistoryRecorder
from flowrunner.store.batch import InlineCommits, _Prepared
from flowrunner.store.crypto import TokenCipher
from flowrunner.store.database import Database
from flowrunner.store.queue import Dedupe, Duplicate, QueuedRun, RunQueue
from flowrunner.store.runs import _INSERT_RUN, RunHistory, RunRecord, StepRecord, finished_rows
from flowrunner.store.wal import LogIndex, sync_database


@pytest.fixture
def database(tmp_path: Path) -> Database:
    return Database.open(f"sqlite:///{tmp_path / 'state.db'}")


def count_commits(database: Database) -> list[str]:
    """The COMMITs SQLite runs from now on, on any connection the engine hands out: the
    name of the thread that ran each."""
    threads: list[str] = []

    def trace(dbapi_connection: Any, *_: Any) -> None:
        def on_sql(sql: str) -> None:
            if sql.strip().upper() == "COMMIT":
                threads.append(threading.current_thread().name)

        dbapi_connection.set_trace_callback(on_sql)

    event.listen(database.engine, "checkout", trace)
    return threads


def rows(database: Database, sql: str) -> list[tuple[Any, ...]]:
    path = str(database.engine.url.database)
    with sqlite3.connect(path) as conn:
        return list(conn.execute(sql))


def queued(run_id: str) -> QueuedRun:
    return QueuedRun(run_id, "flow", {"kind": "webhook"}, {}, None, datetime.now(UTC))


def finished(run_id: str, steps: int = 2) -> RunRecord:
    now = datetime.now(UTC)
    record = RunRecord(run_id, "flow", "succeeded", {}, {}, now, now)
    record.steps = [
        StepRecord(seq, f"s{seq}", "http", "succeeded", now, 1.0) for seq in range(steps)
    ]
    return record


async def test_intakes_submitted_together_share_one_commit(database: Database) -> None:
    """Twenty intakes stored at the same moment: one transaction, every row durable (read
    through another connection) once the futures resolve."""
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    commits = count_commits(database)
    ids = await asyncio.gather(*(queue.enqueue(queued(f"run-{n:02d}")) for n in range(20)))
    assert ids == [f"run-{n:02d}" for n in range(20)]
    assert len(commits) == 1
    assert len(rows(database, "SELECT id FROM run_queue")) == 20
    database.close()


async def test_a_duplicate_key_fails_only_its_own_write(database: Database) -> None:
    """A dedupe key seen before makes the shared commit fail; each write is then done alone:
    the duplicate raises with the first run's id, the others are stored."""
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    window = timedelta(hours=1)
    await queue.enqueue(queued("first"), Dedupe("webhook:flow", "delivery-1", window))
    results = await asyncio.gather(
        queue.enqueue(queued("a"), Dedupe("webhook:flow", "delivery-2", window)),
        queue.enqueue(queued("again"), Dedupe("webhook:flow", "delivery-1", window)),
        queue.enqueue(queued("b")),
        return_exceptions=True,
    )
    assert results[0] == "a" and results[2] == "b"
    assert isinstance(results[1], Duplicate) and results[1].run_id == "first"
    stored = sorted(row[0] for row in rows(database, "SELECT id FROM run_queue"))
    assert stored == ["a", "b", "first"]
    database.close()


async def test_an_expired_dedupe_key_is_replaced(database: Database) -> None:
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    await queue.enqueue(queued("old"), Dedupe("webhook:flow", "k", timedelta(seconds=-1)))
    await queue.enqueue(queued("new"), Dedupe("webhook:flow", "k", timedelta(hours=1)))
    assert rows(database, "SELECT run_id FROM dedupe_keys") == [("new",)]
    database.close()


async def test_a_short_run_is_written_once_with_its_steps(database: Database) -> None:
    """A run that ends before it is worth showing as running: one insert of the whole run
    and its steps, in the commit the engine waits for."""
    history = RunHistory(database)
    bus = EventBus()
    bus.subscribe(HistoryRecorder(history, show_running_after=5).on_event)
    commits = count_commits(database)
    record = finished("short")
    record.status = "running"
    await bus.publish(RunEvent("run_started", record))
    record.status = "succeeded"
    await bus.publish(RunEvent("run_finished", record))
    assert len(commits) == 1
    assert rows(database, "SELECT id, status FROM runs") == [("short", "succeeded")]
    stored = RunHistory(database).get_run("short", exact=True)
    assert stored is not None and [step.seq for step in stored.steps] == [0, 1]
    database.close()


async def test_a_long_run_shows_as_running_then_finished(database: Database) -> None:
    history = RunHistory(database)
    bus = EventBus()
    bus.subscribe(HistoryRecorder(history, show_running_after=0.05).on_event)
    record = finished("long")
    record.status = "running"
    await bus.publish(RunEvent("run_started", record))
    assert rows(database, "SELECT id FROM runs") == []
    for _ in range(100):
        await asyncio.sleep(0.01)
        if rows(database, "SELECT status FROM runs"):
            break
    assert rows(database, "SELECT status FROM runs") == [("running",)]
    record.status = "failed"
    record.error = "step s1: boom"
    await bus.publish(RunEvent("run_finished", record))
    assert rows(database, "SELECT status, error FROM runs") == [("failed", "step s1: boom")]
    stored = history.get_run("long", exact=True)
    assert stored is not None and [step.path for step in stored.steps] == ["s0", "s1"]
    database.close()


async def test_deferred_writes_ride_along_and_are_flushed_on_close(database: Database) -> None:
    """Removing a finished run's intake row is not waited for: it joins the next commit,
    and closing the database writes whatever is still pending."""
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    await queue.enqueue(queued("done"))
    queue.finish_later("done")
    assert database.writes.pending == 1
    database.close()
    assert rows(database, "SELECT id FROM run_queue") == []


async def test_claim_many_takes_only_runs_still_queued_in_the_order_asked(
    database: Database,
) -> None:
    """The dispatcher claims the runs it starts in one statement; a run another worker took
    meanwhile is not returned, and the payloads come back decrypted."""
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    other = RunQueue(database, TokenCipher.from_passphrase("k"), node="n2")
    for name in ("a", "b", "c"):
        run = queued(name)
        run.user_token = f"token-{name}"
        await queue.enqueue(run)
    assert [run_id for run_id, _ in queue.waiting()] == ["a", "b", "c"]
    assert other.claim("b")
    claimed = queue.claim_many(["c", "b", "a"])
    assert [(run.id, run.user_token) for run in claimed] == [("c", "token-c"), ("a", "token-a")]
    assert queue.waiting() == []
    nodes = dict(rows(database, "SELECT id, node FROM run_queue"))
    assert nodes == {"a": "n1", "b": "n2", "c": "n1"}
    database.close()


async def test_a_bare_date_output_is_saved_as_iso_text(database: Database) -> None:
    """A step output that is a datetime (``${{ now() }}``) does not stop the run's record
    from being written: it is stored as ISO 8601 text."""
    history = RunHistory(database)
    record = finished("dated", steps=1)
    when = datetime(2026, 11, 22, 7, 30, tzinfo=UTC)
    record.outputs = {"when": when}
    record.steps[0].outputs = {"when": when, "wait": timedelta(seconds=90)}
    await history.write_finished(record, started_written=False)
    stored = history.get_run("dated")
    assert stored is not None and stored.status == "succeeded"
    assert stored.outputs == {"when": "2026-11-22T07:30:00+00:00"}
    assert stored.steps[0].outputs == {"when": "2026-11-22T07:30:00+00:00", "wait": 90.0}
    database.close()


def test_the_server_keeps_the_write_ahead_log_small_from_a_thread(tmp_path: Path) -> None:
    """Commits never checkpoint below ~40 MB of log; the background checkpoint copies the
    log into the database (what a server runs), so the data is in the main file."""
    path = tmp_path / "state.db"
    database = Database.open(f"sqlite:///{path}")
    with database.engine.connect() as conn:
        limit = conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
    assert limit == 10_000
    history = RunHistory(database)
    for n in range(200):
        history.record(finished(f"run-{n:03d}"))
    wal = path.with_name("state.db-wal")
    assert wal.stat().st_size > 0
    before = path.stat().st_size
    database.checkpoint_in_background(every=0.05)
    for _ in range(100):
        if path.stat().st_size > before:
            break
        threading.Event().wait(0.05)
    assert path.stat().st_size > before  # the log's pages reached the database file
    database.close()
    assert len(rows(database, "SELECT id FROM runs")) == 200


async def test_group_commit_stores_exactly_what_a_plain_write_stores(database: Database) -> None:
    """The group commit hands the driver values it converted itself (JSON, dates): the
    stored text must be the same as through SQLAlchemy's own path, or sorting by time and
    reading back would differ between runs written one way and the other."""
    history = RunHistory(database)
    plain, grouped = finished("plain"), finished("grouped")
    at = datetime(2026, 3, 1, 7, 0, 0, 250000, tzinfo=UTC)
    for record in (plain, grouped):
        record.outputs = {"when": at, "none": None}
        record.started_at = record.finished_at = at
        for step in record.steps:
            step.started_at = at
    history.record(plain)
    await asyncio.gather(
        history.write_finished(grouped, started_written=False),
        history.write_finished(finished("other"), started_written=False),
    )
    by_id = {row[0]: row[1:] for row in rows(database, "SELECT * FROM runs")}
    assert by_id["grouped"] == by_id["plain"]
    database.close()


async def test_a_failed_transaction_leaves_the_connection_usable(database: Database) -> None:
    """The group commit keeps one connection: a write that fails half-way (the second of
    two runs is a duplicate) is rolled back whole, and the next write goes through."""
    history = RunHistory(database)
    history.record(finished("first"))
    try:
        history.writes.write_now(
            [
                *finished_rows(finished("second"), started_written=False),
                *finished_rows(finished("first"), started_written=False),
            ]
        )
    except sqlite3.IntegrityError:
        pass
    else:
        pytest.fail("a duplicate run id was accepted")
    assert rows(database, "SELECT id FROM runs") == [("first",)]  # "second" rolled back
    await history.write_finished(finished("third"), started_written=False)
    assert sorted(rows(database, "SELECT id FROM runs")) == [("first",), ("third",)]
    database.close()


async def test_a_run_s_intake_row_goes_with_its_history_unless_interrupted(
    database: Database,
) -> None:
    """The dispatcher hands the history the removal of a run's intake row: one commit
    writes the run's end and removes the row. An interrupted run keeps its row (the next
    start restarts it), and the rows are then the dispatcher's to drop."""
    history = RunHistory(database)
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    commits = count_commits(database)
    for run_id in ("done", "cut"):
        await queue.enqueue(queued(run_id), claim=True)
        history.finish_with(run_id, queue.finish_rows(run_id))
    before = len(commits)
    await history.write_finished(finished("done"), started_written=False)
    assert len(commits) == before + 1
    assert rows(database, "SELECT id FROM run_queue") == [("cut",)]
    assert history.forget("done") is False  # written with the history

    cut = finished("cut")
    cut.status = "interrupted"
    await history.write_finished(cut, started_written=False)
    assert rows(database, "SELECT id, status FROM run_queue") == [("cut", "running")]
    assert history.forget("cut") is True
    database.close()


async def test_a_history_that_cannot_be_written_still_leaves_the_queue(
    database: Database,
) -> None:
    """The intake row's removal rides in the run end's commit; if that commit fails for
    the run's own sake, the removal is done alone: the run is not left in the queue to be
    taken for interrupted, and run again, at the next start."""
    history = RunHistory(database)
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    await queue.enqueue(queued("odd"), claim=True)
    history.finish_with("odd", queue.finish_rows("odd"))
    odd = finished("odd")
    odd.finished_at = "not a time"  # type: ignore[assignment]  # refused by the DATETIME column
    with pytest.raises(TypeError):
        await history.write_finished(odd, started_written=False)
    await asyncio.sleep(0)  # the removal, retried alone, is committed in the same flush
    assert rows(database, "SELECT id FROM run_queue") == []
    assert rows(database, "SELECT id FROM runs") == []
    database.close()


def slow_down_inserts(database: Database, seconds: float) -> None:
    """Every intake row inserted from now on takes ``seconds`` more to write (a trigger
    calls a function that sleeps): a disk that stalls, as SQLite's log restart does."""

    def add_function(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.create_function("stall", 0, lambda: time.sleep(seconds))

    event.listen(database.engine, "checkout", add_function)
    with database.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER stall_inserts AFTER INSERT ON run_queue BEGIN SELECT stall(); END"
        )


async def test_the_event_loop_runs_on_while_a_commit_waits_for_the_disk(
    database: Database,
) -> None:
    """The transaction runs on the writer thread: an intake that takes 0.3 s to commit is
    answered only then, and meanwhile the loop keeps serving everything else."""
    slow_down_inserts(database, 0.3)
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    ticks: list[float] = []

    async def tick() -> None:
        for _ in range(40):  # 0.4 s at most
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    started = time.monotonic()
    await queue.enqueue(queued("slow"))
    assert time.monotonic() - started >= 0.3
    await ticker
    assert max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) < 0.15
    assert rows(database, "SELECT id FROM run_queue") == [("slow",)]
    database.close()


async def test_writes_submitted_during_a_commit_share_the_next_one(database: Database) -> None:
    slow_down_inserts(database, 0.2)
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    commits = count_commits(database)
    first = asyncio.create_task(queue.enqueue(queued("first")))
    await asyncio.sleep(0.05)  # the first transaction is with the writer thread
    later = [queue.enqueue(queued(f"later-{n}")) for n in range(5)]
    await asyncio.gather(first, *later)
    assert len(commits) == 2
    assert len(rows(database, "SELECT id FROM run_queue")) == 6
    database.close()


async def test_a_flush_commits_after_the_batch_the_writer_holds(database: Database) -> None:
    """Shutdown flushes on the loop's thread while the writer thread may still hold a
    batch: writes keep the order they were submitted in (an intake row, then its
    removal), so the row is gone in the end."""
    slow_down_inserts(database, 0.2)
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    intake = asyncio.create_task(queue.enqueue(queued("run")))
    await asyncio.sleep(0.05)
    queue.finish_later("run")
    database.writes.flush()
    assert rows(database, "SELECT id FROM run_queue") == []
    await intake
    database.close()


def test_a_runtime_used_by_a_second_event_loop_still_commits(database: Database) -> None:
    """A batch handed off by a loop that closed before hearing back (the CLI runs
    asyncio.run more than once) does not hold up the writes of the next loop."""
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    first = asyncio.new_event_loop()

    async def finish_and_leave() -> None:
        queue.finish_later("gone")
        await asyncio.sleep(0)  # handed to the writer thread

    first.run_until_complete(finish_and_leave())
    time.sleep(0.2)  # the writer is done; its answer waits for a loop that never runs
    first.close()

    async def enqueue() -> str:
        return await asyncio.wait_for(queue.enqueue(queued("next")), 5)

    assert asyncio.run(enqueue()) == "next"
    assert rows(database, "SELECT id FROM run_queue") == [("next",)]
    database.close()


async def test_a_write_after_close_is_committed_without_a_writer_thread(
    database: Database,
) -> None:
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    await queue.enqueue(queued("run"))
    database.close()
    queue.finish_later("run")  # a timer firing during shutdown
    await asyncio.sleep(0)
    assert rows(database, "SELECT id FROM run_queue") == []
    assert "state-writer" not in [thread.name for thread in threading.enumerate()]


# ---------------------------------------------------------------- runs stored late


async def test_a_started_run_s_intake_is_written_by_itself_after_its_delay(
    database: Database,
) -> None:
    """A run started before it was stored (its caller waits for its end): when nothing else
    commits, its intake row is written on its own once the delay is over, claimed by this
    node, as a crash would need to find it."""
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    intake = queue.enqueue_started(queued("slow"), within=0.05)
    await asyncio.sleep(0.02)
    assert rows(database, "SELECT id FROM run_queue") == []
    await asyncio.wait_for(asyncio.shield(intake.written), 5)
    assert rows(database, "SELECT id, status, node FROM run_queue") == [("slow", "running", "n1")]
    assert intake.take_back() is False  # written: only its removal can undo it
    database.close()


async def test_a_started_run_s_intake_rides_along_with_another_commit(database: Database) -> None:
    """The intake joins the first commit that happens anyway, well before its delay."""
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    commits = count_commits(database)
    intake = queue.enqueue_started(queued("waited"), within=30)
    await queue.enqueue(queued("other"))
    assert len(commits) == 1
    assert intake.written.done()
    assert sorted(rows(database, "SELECT id FROM run_queue")) == [("other",), ("waited",)]
    database.close()


async def test_a_run_that_ends_before_its_intake_is_written_is_one_write(
    database: Database,
) -> None:
    """The run ends within the delay: its intake row is taken back, and the history, in one
    commit, is all that is written; whoever waited for the intake learns the run is stored
    once that commit is done."""
    history = RunHistory(database)
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    commits = count_commits(database)
    intake = queue.enqueue_started(queued("quick"), within=30)
    history.finish_with("quick", queue.finish_rows("quick"), intake)
    await history.write_finished(finished("quick"), started_written=False)
    assert len(commits) == 1
    assert intake.written.done() and intake.written.exception() is None
    assert rows(database, "SELECT id FROM run_queue") == []
    assert rows(database, "SELECT id, status FROM runs") == [("quick", "succeeded")]
    await asyncio.sleep(0.05)
    assert database.writes.pending == 0  # nothing left to write later
    database.close()


async def test_a_run_that_ends_after_its_intake_was_written_removes_it(
    database: Database,
) -> None:
    history = RunHistory(database)
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    intake = queue.enqueue_started(queued("long"), within=0.01)
    history.finish_with("long", queue.finish_rows("long"), intake)
    await asyncio.wait_for(asyncio.shield(intake.written), 5)
    assert rows(database, "SELECT id FROM run_queue") == [("long",)]
    await history.write_finished(finished("long"), started_written=False)
    await asyncio.sleep(0.05)  # the removal rides with the next commit
    assert rows(database, "SELECT id FROM run_queue") == []
    assert rows(database, "SELECT id FROM runs") == [("long",)]
    database.close()


async def test_an_interrupted_run_s_pending_intake_is_written_at_shutdown(
    database: Database,
) -> None:
    """Shut down while a run started before it was stored: the run ends interrupted, its
    intake row is not taken back but written by the closing flush, so the next start finds
    it (and restarts it where the flow says so)."""
    history = RunHistory(database)
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    intake = queue.enqueue_started(queued("cut"), within=30)
    history.finish_with("cut", queue.finish_rows("cut"), intake)
    cut = finished("cut")
    cut.status = "interrupted"
    await history.write_finished(cut, started_written=False)
    database.close()
    assert rows(database, "SELECT id, status FROM run_queue") == [("cut", "running")]
    assert rows(database, "SELECT id, status FROM runs") == [("cut", "interrupted")]


async def test_a_deferred_write_taken_back_never_makes_its_rows(database: Database) -> None:
    """Most runs end before their intake is due: what their rows would have cost (sealing
    the trigger's headers, encrypting the user's token) is not paid."""
    made: list[str] = []

    def make(run_id: str) -> list[Any]:
        made.append(run_id)
        return finished_rows(finished(run_id), started_written=False)

    deferred = database.writes.submit_deferred(lambda: make("taken"), within=30)
    assert deferred.take_back() is True
    kept = database.writes.submit_deferred(lambda: make("kept"), within=0.01)
    await asyncio.wait_for(asyncio.shield(kept.written), 5)
    assert made == ["kept"]
    assert rows(database, "SELECT id FROM runs") == [("kept",)]
    database.close()


async def test_a_deferred_write_whose_rows_cannot_be_made_fails_alone(database: Database) -> None:
    """The rows are made as the commit they join is handed off: one that fails there fails
    its own write, and the commit goes on with the others."""
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")

    def broken() -> list[Any]:
        raise ValueError("no rows")

    deferred = database.writes.submit_deferred(broken, within=30)
    await queue.enqueue(queued("other"))
    with pytest.raises(ValueError, match="no rows"):
        await asyncio.wait_for(asyncio.shield(deferred.written), 5)
    assert rows(database, "SELECT id FROM run_queue") == [("other",)]
    database.close()


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 23, 8, 36, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 23, 8, 36, tzinfo=UTC),  # no microseconds: still six zeros
        datetime(2026, 11, 23, 8, 36, 0, 5, tzinfo=UTC),  # the same second: its text kept
        datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=2))),  # not UTC
        datetime(2026, 1, 2, 3, 4, 5, 6),  # naive
        datetime(999, 1, 1),  # a three-digit year
        date(2026, 1, 2),
        None,
    ],
)
def test_the_quick_bind_processors_write_what_sqlalchemy_writes(
    database: Database, value: Any
) -> None:
    """The group commit's own processors for dates and JSON give the text SQLAlchemy's
    would, value for value."""
    dialect = database.engine.dialect
    prepared = _Prepared.of(_INSERT_RUN, ("id", "started_at", "outputs"), dialect)
    quick = dict(zip(prepared.names, prepared.processors, strict=True))
    stock_date = DateTime(timezone=True).dialect_impl(dialect).bind_processor(dialect)
    stock_json = JSON().dialect_impl(dialect).bind_processor(dialect)
    assert stock_date is not None and stock_json is not None
    assert quick["started_at"] is not stock_date
    assert quick["started_at"](value) == stock_date(value)
    document = {"at": value, "n": [1, None]}
    assert quick["outputs"](document) == stock_json(document)
    assert quick["outputs"](value) == stock_json(value)
    database.close()


async def write_runs(history: RunHistory, names: list[str]) -> None:
    for name in names:  # one at a time: each a lone write
        await history.write_finished(finished(name), started_written=False)


def watch(database: Database) -> InlineCommits:
    """The checkpoint thread running (it keeps the log's index readable for the gate), but
    checkpointing nothing during the test."""
    database.checkpoint_in_background(every=3600)
    gate = database.writes.inline
    assert gate.log is not None
    return gate


def checkpoint_all(database: Database) -> None:
    """A checkpoint from another connection that copies the whole log: the next commit
    restarts the log, and syncs it."""
    with sqlite3.connect(str(database.engine.url.database)) as conn:
        busy, in_log, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and copied == in_log > 0


def wal_restarts(path: Path) -> int:
    """The log's checkpoint sequence number, from its header: it grows by one each time
    the log restarts."""
    with open(path.with_name(path.name + "-wal"), "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


async def test_a_lone_write_is_committed_on_the_loop_while_the_log_is_quiet(
    database: Database,
) -> None:
    """With the checkpoint thread keeping the log's index readable, a lone write skips the
    hand-off to the writer thread."""
    threads = count_commits(database)
    watch(database)
    history = RunHistory(database)
    await write_runs(history, ["a", "b", "c"])
    assert threads == ["MainThread"] * 3
    await asyncio.gather(  # submitted together: one commit, with the writer thread
        history.write_finished(finished("d"), started_written=False),
        history.write_finished(finished("e"), started_written=False),
    )
    assert threads[3:] == ["state-writer"]
    # A write that looks a duplicate up when it fails does so on the writer thread.
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    await queue.enqueue(queued("f"), Dedupe("webhook:flow", "delivery-1", timedelta(hours=1)))
    assert threads[4:] == ["state-writer"]
    database.close()
    assert sorted(rows(database, "SELECT id FROM runs")) == [(n,) for n in "abcde"]


async def test_without_the_checkpoint_thread_every_commit_is_the_writer_thread_s(
    database: Database,
) -> None:
    """A short command (no checkpoint thread) does not read the log: the loop never
    commits itself."""
    threads = count_commits(database)
    await write_runs(RunHistory(database), ["a", "b", "c"])
    assert threads == ["state-writer"] * 3
    database.close()


async def test_the_commit_that_restarts_the_log_is_the_writer_thread_s(tmp_path: Path) -> None:
    """After a checkpoint that copied the whole log, the next commit restarts the log and
    syncs it: the loop rolls its transaction back and hands the write off; the commit
    after that is the loop's again. Nothing is lost or written twice."""
    path = tmp_path / "state.db"
    database = Database.open(f"sqlite:///{path}")
    threads = count_commits(database)
    watch(database)
    history = RunHistory(database)
    await write_runs(history, ["quiet"])
    checkpoint_all(database)
    restarts = wal_restarts(path)
    await write_runs(history, ["restarts", "after"])
    assert threads == ["MainThread", "state-writer", "MainThread"]
    assert wal_restarts(path) == restarts + 1
    database.close()
    assert sorted(rows(database, "SELECT id FROM runs")) == [("after",), ("quiet",), ("restarts",)]


@pytest.mark.parametrize("why", ["the log near the checkpoint size", "no index to read"])
async def test_a_commit_that_may_wait_for_the_disk_is_left_to_the_writer_thread(
    tmp_path: Path, why: str
) -> None:
    """Near ``wal_autocheckpoint`` frames a commit checkpoints; without the log's index
    (not in WAL mode, say) the loop cannot tell: either way the writer thread commits."""
    database = Database.open(f"sqlite:///{tmp_path / 'state.db'}")
    threads = count_commits(database)
    gate = watch(database)
    history = RunHistory(database)
    await write_runs(history, ["quiet"])
    if why == "no index to read":
        gate.log = LogIndex(tmp_path / "elsewhere.db")
    else:
        assert gate.log is not None
        frames = gate.log.frames()
        assert frames is not None
        gate.max_log_frames = frames[0]  # the log at the limit already
    await write_runs(history, ["waits"])
    assert threads == ["MainThread", "state-writer"]
    database.close()


async def test_while_another_connection_writes_the_loop_leaves_its_commits_to_the_thread(
    database: Database,
) -> None:
    """A prune holds SQLite's write lock in its transactions: during it the loop hands
    off, and after it commits itself again."""
    threads = count_commits(database)
    gate = watch(database)
    history = RunHistory(database)
    await write_runs(history, ["first"])
    with gate.outside():  # as a prune's transactions are, from its thread
        assert not gate.open()
        await write_runs(history, ["during"])
    assert await asyncio.to_thread(history.prune, datetime.now(UTC) + timedelta(days=1)) == 2
    await write_runs(history, ["after"])
    ours = [name for name in threads if name in ("MainThread", "state-writer")]
    assert ours == ["MainThread", "state-writer", "MainThread"]
    database.close()


@pytest.mark.parametrize("checkpoints", ["the checkpoint thread's", "another connection's"])
async def test_the_loop_never_restarts_the_log(tmp_path: Path, checkpoints: str) -> None:
    """The commit that restarts the log after a complete checkpoint syncs it: with
    checkpoints completing again and again during lone writes, from the real checkpoint
    thread or from another connection in a tight loop, the log restarts many times, and
    never in a commit on the loop."""
    path = tmp_path / "state.db"
    database = Database.open(f"sqlite:///{path}")
    database.checkpoint_in_background(every=0.005 if checkpoints.startswith("the") else 3600)
    stop = threading.Event()

    def checkpoint_now_and_then() -> None:
        pauses = itertools.cycle((0, 0, 0.001, 0, 0.003))
        with sqlite3.connect(path) as conn:
            while not stop.wait(next(pauses)):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    checkpointer = threading.Thread(target=checkpoint_now_and_then)
    if checkpoints == "another connection's":
        checkpointer.start()
    batcher = database.writes
    restarts_by_thread: list[tuple[str, int]] = []
    loop_commits = 0
    commit = batcher._commit

    def observed(rows: Any, only_if_quiet: bool = False) -> bool:
        nonlocal loop_commits
        before = wal_restarts(path)
        committed = commit(rows, only_if_quiet)
        restarts_by_thread.append((threading.current_thread().name, wal_restarts(path) - before))
        loop_commits += committed and threading.current_thread().name == "MainThread"
        return committed

    batcher._commit = observed  # type: ignore[method-assign]
    history = RunHistory(database)
    try:
        for n in range(150):
            await history.write_finished(finished(f"run-{n:03d}"), started_written=False)
            await asyncio.sleep(0.002 if n % 3 else 0.02)  # now and then, time to checkpoint
    finally:
        stop.set()
        if checkpointer.is_alive():
            checkpointer.join()
    database.close()
    on_the_loop = [r for name, r in restarts_by_thread if name == "MainThread"]
    on_the_thread = [r for name, r in restarts_by_thread if name != "MainThread"]
    assert loop_commits > 10, "hardly a commit on the loop: nothing was tested"
    restarts = sum(on_the_loop) + sum(on_the_thread)
    assert restarts > 10, "the log hardly restarted: nothing was tested"
    assert sum(on_the_loop) == 0, f"{sum(on_the_loop)} of {restarts} restarts on the loop"
    assert len(rows(database, "SELECT id FROM runs")) == 150


def test_the_log_index_says_what_sqlite_says(tmp_path: Path) -> None:
    """The frames in the log and those copied, read from the log's index, are the numbers
    SQLite's own checkpoint reports."""
    path = tmp_path / "plain.db"
    index = LogIndex(path)
    assert index.frames() is None  # no database, no index
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("CREATE TABLE t (x TEXT)")
        for n in range(20):
            conn.execute("INSERT INTO t VALUES (?)", (str(n) * 500,))
        in_log, copied = index.frames() or (0, 0)
        assert in_log >= 20 and copied == 0
        _, reported, reported_copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert index.frames() == (reported, reported_copied) == (in_log, in_log)
        conn.execute("INSERT INTO t VALUES ('restarts')")
        assert index.frames() == (1, 0)
    index.close()


def test_the_gate_reads_the_log_only_while_the_checkpoint_thread_runs(tmp_path: Path) -> None:
    database = Database.open(f"sqlite:///{tmp_path / 'state.db'}")
    gate = database.writes.inline
    assert not gate.open()
    database.checkpoint_in_background(every=0.01)
    assert gate.open()
    database.close()
    assert gate.log is None and not gate.open()


async def test_a_large_lone_write_is_the_writer_thread_s(database: Database) -> None:
    """A write with much text could fill SQLite's page cache, which then writes to the log
    before the loop has looked at it: the writer thread commits it, log quiet or not."""
    threads = count_commits(database)
    watch(database)
    history = RunHistory(database)
    await write_runs(history, ["small"])
    large = finished("large")
    large.outputs = {"report": "x" * (3 * 1024 * 1024)}
    await history.write_finished(large, started_written=False)
    await write_runs(history, ["small-again"])
    assert threads == ["MainThread", "state-writer", "MainThread"]
    database.close()
    assert rows(database, "SELECT length(outputs) > 3000000 FROM runs WHERE id = 'large'") == [(1,)]


async def test_a_lone_write_that_fails_on_the_loop_fails_once(database: Database) -> None:
    """Its transaction was its own: the write fails with SQLite's error, without another
    try on the writer thread, and the next write commits on the loop."""
    watch(database)
    history = RunHistory(database)
    await write_runs(history, ["taken"])
    attempts: list[str] = []
    commit = database.writes._commit

    def counted(rows: Any, only_if_quiet: bool = False) -> bool:
        attempts.append(threading.current_thread().name)
        return commit(rows, only_if_quiet)

    database.writes._commit = counted  # type: ignore[method-assign]
    with pytest.raises(sqlite3.IntegrityError):
        await write_runs(history, ["taken"])  # the same run id again
    assert attempts == ["MainThread"]
    await write_runs(history, ["next"])
    assert attempts == ["MainThread", "MainThread"]
    database.close()
    assert sorted(rows(database, "SELECT id FROM runs")) == [("next",), ("taken",)]


async def test_a_database_reached_through_a_link_has_its_log_read(tmp_path: Path) -> None:
    """SQLite puts the log's index next to the real file: read there, not beside the link."""
    (tmp_path / "real").mkdir()
    Database.open(f"sqlite:///{tmp_path / 'real' / 'state.db'}").close()
    link = tmp_path / "state.db"
    link.symlink_to(tmp_path / "real" / "state.db")
    database = Database.open(f"sqlite:///{link}")
    threads = count_commits(database)
    gate = watch(database)
    assert gate.log is not None and gate.log.frames() is not None
    await write_runs(RunHistory(database), ["a", "b"])
    # (The first write of a new log syncs its header: the writer thread's.)
    assert threads == ["state-writer", "MainThread"]
    database.close()


# Run by another process: may it lock these bytes of a file exclusively? Of the log's
# index, the byte by which SQLite's connections say the index is in use (UNIX_SHM_DMS,
# 128), as a process opening the database first does; of the database, the range of
# SHARED locks (from PENDING_BYTE + 2, 510 bytes), as a process closing the last
# connection does before it deletes the log.
_TRY_A_LOCK = """
import fcntl, sys
with open(sys.argv[1], "r+b") as file:
    try:
        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB, int(sys.argv[3]), int(sys.argv[2]))
    except OSError:
        print("in use")
    else:
        print("free")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
async def test_reading_the_log_keeps_sqlite_s_locks_on_it(tmp_path: Path) -> None:
    """Reading the log's index and syncing the database must not drop this process's
    locks on those files, as closing a descriptor of ours would: another process opening
    the database would then find the index unused and rebuild it under the server, or
    one closing it would delete the log."""
    path = tmp_path / "state.db"
    database = Database.open(f"sqlite:///{path}")
    gate = watch(database)
    threads = count_commits(database)
    await write_runs(RunHistory(database), ["a", "b", "c"])
    assert threads[1:] == ["MainThread", "MainThread"]  # the gate read the index
    assert gate.log is not None and gate.log.frames() is not None
    assert sync_database(path)

    def probe(file: Path, start: int, length: int) -> str:
        done = subprocess.run(  # noqa: S603 - our own interpreter and script
            [sys.executable, "-c", _TRY_A_LOCK, str(file), str(start), str(length)],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    assert probe(path.with_name("state.db-shm"), 128, 1) == "in use"
    assert probe(path, 0x40000002, 510) == "in use"
    database.close()
    assert probe(path, 0x40000002, 510) == "free"  # (the probe sees a lock it may take)


async def test_a_held_batcher_makes_the_loop_hand_off_and_the_writer_wait(
    database: Database,
) -> None:
    """While the checkpoint thread holds the batcher, the loop does not wait for it: its
    lone write goes to the writer thread, which commits it once the hold ends."""
    threads = count_commits(database)
    watch(database)
    history = RunHistory(database)
    await write_runs(history, ["before"])
    released = threading.Event()

    def hold() -> None:
        with database.writes.held():
            released.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        written = history.write_finished(finished("held"), started_written=False)
        ticks = 0
        for _ in range(20):  # the loop runs on meanwhile; the write waits
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20 and not written.done()
    finally:
        released.set()
        holder.join(10)
    await asyncio.wait_for(written, 10)
    await write_runs(history, ["after"])
    assert threads == ["MainThread", "state-writer", "MainThread"]
    database.close()
    assert sorted(rows(database, "SELECT id FROM runs")) == [("after",), ("before",), ("held",)]


def max_frames_while_writing(database: Database, path: Path, commits: int) -> tuple[int, int]:
    """Commits one after the other from a thread, as fast as they go (a checkpoint seldom
    finds a moment without one): the most frames the log had, and how often it restarted."""
    gate = database.writes.inline
    history = RunHistory(database)
    restarts = wal_restarts(path)
    most = 0
    for n in range(commits):
        history.record(finished(f"run-{n:05d}", steps=1))
        frames = gate.log.frames() if gate.log is not None else None
        most = max(most, frames[0] if frames else 0)
    return most, wal_restarts(path) - restarts


def test_the_checkpoint_thread_restarts_a_log_that_commits_keep_busy(tmp_path: Path) -> None:
    """With a commit landing during each of its checkpoints, the thread's checkpoint never
    copies the whole log by itself; past ``restart_at`` frames it copies the rest with the
    commits held, and the log restarts long before the size at which a commit would
    checkpoint."""
    path = tmp_path / "state.db"
    database = Database.open(f"sqlite:///{path}")
    database.checkpoint_in_background(every=0.002, restart_at=300)
    most, restarts = max_frames_while_writing(database, path, 3000)
    database.close()
    assert restarts >= 3
    assert most < 2_000  # 3,000 commits of several pages each: far more without restarts
    assert len(rows(database, "SELECT id FROM runs")) == 3000


def test_a_hold_that_cannot_finish_is_not_tried_at_every_turn(tmp_path: Path) -> None:
    """A reader of an older state in another connection keeps the last frames from any
    checkpoint: the thread holds the commits once, then again only once the log has grown
    by a quarter of ``restart_at`` frames; once the reader is gone, the log restarts."""
    path = tmp_path / "state.db"
    database = Database.open(f"sqlite:///{path}")
    holds = 0
    hold = database.writes.held

    @contextlib.contextmanager
    def counted() -> Iterator[None]:
        nonlocal holds
        holds += 1
        with hold():
            yield

    database.writes.held = counted  # type: ignore[method-assign]
    history = RunHistory(database)
    history.record(finished("first", steps=1))
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM runs").fetchone()  # a snapshot, kept
    database.checkpoint_in_background(every=0.002, restart_at=300)
    gate = database.writes.inline
    for n in range(250):  # paced: many turns of the thread meanwhile
        history.record(finished(f"run-{n:03d}", steps=1))
        time.sleep(0.002)
    frames = gate.log.frames() if gate.log is not None else None
    assert frames is not None and frames[0] > 600  # the log grew: no restart
    assert 1 <= holds <= (frames[0] - 300) // 75 + 1  # (not at each of its turns)
    reader.execute("COMMIT")
    reader.close()
    restarts = wal_restarts(path)
    for n in range(400):
        history.record(finished(f"after-{n:03d}", steps=1))
        if wal_restarts(path) > restarts:
            break
        time.sleep(0.002)
    assert wal_restarts(path) > restarts
    database.close()
    assert len(rows(database, "SELECT id FROM runs")) == 252 + n
