"""Run history: each run with its trigger, inputs and status, each step with what it sent
and received (already masked by the engine)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from flowrunner.store.batch import INSERT, UPDATE, Deferred, Row
from flowrunner.store.database import Database, delete_in_batches
from flowrunner.store.schema import run_steps, runs


@dataclass
class StepRecord:
    seq: int
    path: str
    kind: str
    status: str
    started_at: datetime
    duration_ms: float
    attempts: int = 0
    request: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    outputs: Any = None
    message: str | None = None
    error: str | None = None


@dataclass
class RunRecord:
    id: str
    flow: str
    status: str
    trigger: dict[str, Any]
    inputs: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None = None
    outputs: Any = None
    response: dict[str, Any] | None = None
    error: str | None = None
    user: str | None = None
    parent_id: str | None = None
    steps: list[StepRecord] = field(default_factory=list)


_STEP_COLUMNS = (
    "seq", "path", "kind", "status", "started_at", "duration_ms", "attempts",
    "request", "response", "outputs", "message", "error",
)  # fmt: skip


# Built once: every run writes these, and building a statement per call costs more than
# running it.
_INSERT_RUN = insert(runs)
_LISTED = [column for column in runs.c if column.name != "steps"]  # a list needs no steps
_FINISH_RUN = (
    update(runs)
    .where(runs.c.id == bindparam("run_key"))
    .values(
        status=bindparam("status"),
        finished_at=bindparam("finished_at"),
        outputs=bindparam("outputs"),
        response=bindparam("response"),
        error=bindparam("error"),
        steps=bindparam("steps"),
    )
)


_UNFINISHED = ("running", "queued")


class RunHistory:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.engine = database.engine
        self.writes = database.writes
        self._companions: dict[str, tuple[list[Row], Deferred | None]] = {}

    def finish_with(self, run_id: str, rows: Sequence[Row], intake: Deferred | None = None) -> None:
        """Rows to write with this run's end, in the same group commit: the removal of its
        intake row, so that a finished run is not also seen waiting in the queue, and its
        end costs one commit. Not for an interrupted run, which keeps its intake row for
        the next start.

        With ``intake``, the run started before its intake row was written: if that row
        is still waiting for a commit when the run ends, it is taken back, and the
        history alone records the run (its ``written`` follows the history's)."""
        self._companions[run_id] = (list(rows), intake)

    def forget(self, run_id: str) -> bool:
        """Drop what ``finish_with`` gave for this run; True if it was never written."""
        return self._companions.pop(run_id, None) is not None

    def record_started(self, run: RunRecord) -> None:
        self.writes.write_now([(INSERT, _INSERT_RUN, _run_row(run))])

    def record(self, run: RunRecord) -> None:
        """A whole run (refused at intake, or found dead at start) in one transaction."""
        self.writes.write_now(finished_rows(run, started_written=False))

    def record_finished(self, run: RunRecord) -> None:
        """Steps and the final status in one transaction: one write per run, not per step."""
        self.writes.write_now(finished_rows(run, started_written=True))

    def write_started(self, run: RunRecord) -> None:
        """The run's row, with the next group commit; nobody waits for it."""
        self.writes.submit_later([(INSERT, _INSERT_RUN, _run_row(run))])

    def write_finished(self, run: RunRecord, started_written: bool) -> asyncio.Future[Any]:
        """The run's final state and steps, with the next group commit. Without
        ``started_written`` the whole run is one insert: most runs end before their start
        was worth writing."""
        written = self.writes.submit(finished_rows(run, started_written))
        companions = self._companions.pop(run.id, None) if run.status != "interrupted" else None
        if companions is not None:
            rows, intake = companions
            if intake is not None and intake.take_back(instead=written):
                rows = []  # the intake row was never written
            # Submitted in the same turn: the same transaction. Should that fail, each is
            # done again alone, so a history that cannot be written (a value SQLite
            # refuses) does not keep a finished run in the queue, to run again.
            if rows:
                self.writes.submit_later(rows)
        return written

    def list_runs(self, flow: str | None = None, limit: int = 50) -> list[RunRecord]:
        query = select(*_LISTED).order_by(runs.c.started_at.desc()).limit(limit)
        if flow:
            query = query.where(runs.c.flow == flow)
        with self.engine.connect() as conn:
            return [_run(row._mapping) for row in conn.execute(query)]

    def get_run(self, run_id: str, exact: bool = False) -> RunRecord | None:
        """The run whose id is ``run_id``, or (unless ``exact``) starts with it, as users
        type the first characters of an id; the prefix look-up scans the table."""
        match = runs.c.id == run_id if exact else runs.c.id.startswith(run_id)
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(match)).first()
            if row is None:
                return None
            run = _run(row._mapping)
            if row.steps is not None:
                run.steps = [_step_of_json(step) for step in row.steps]
            else:  # written before schema 5, or still running
                steps = conn.execute(
                    select(run_steps).where(run_steps.c.run_id == run.id).order_by(run_steps.c.seq)
                )
                run.steps = [_step(s._mapping) for s in steps]
            return run

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(status=status, error=error, finished_at=datetime.now(UTC))
            )

    def mark_unfinished(self, status: str) -> int:
        """Runs left 'running' by a process that died; returns how many were marked."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(runs).where(runs.c.status == "running").values(status=status)
            )
            return int(result.rowcount or 0)

    def prune(
        self, before: datetime, stop: threading.Event | None = None, first_batch: int = 10
    ) -> int:
        """Remove the finished runs that started before ``before``, oldest first; how
        many. In short transactions (see ``delete_in_batches``), until done or ``stop``
        is set. A run still going is kept, however old."""

        def delete_batch(conn: Connection, size: int) -> int:
            # The ids as a subquery, not as parameters: SQLite before 3.32 takes 999.
            oldest = (
                select(runs.c.id)
                .where(runs.c.started_at < before.astimezone(UTC))
                .where(runs.c.finished_at.is_not(None))
                .where(runs.c.status.not_in(_UNFINISHED))
                .order_by(runs.c.started_at)
                .limit(size)
                .scalar_subquery()
            )
            conn.execute(delete(run_steps).where(run_steps.c.run_id.in_(oldest)))
            return int(conn.execute(delete(runs).where(runs.c.id.in_(oldest))).rowcount or 0)

        return delete_in_batches(self.database, delete_batch, stop, first_batch)

    def delete_run(self, run_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(run_steps).where(run_steps.c.run_id == run_id))
            conn.execute(delete(runs).where(runs.c.id == run_id))


def _run_row(run: RunRecord) -> dict[str, Any]:
    return {
        "id": run.id,
        "flow": run.flow,
        "status": str(run.status),  # a plain str: sqlite3 binds a str enum the slow way
        "trigger": run.trigger,
        "inputs": run.inputs,
        "outputs": run.outputs,
        "response": run.response,
        "error": run.error,
        "user": run.user,
        "parent_id": run.parent_id,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "steps": _steps_json(run.steps),
    }


def _steps_json(steps: list[StepRecord]) -> list[dict[str, Any]]:
    """The steps as the ``steps`` column keeps them (times become ISO text): a copy of
    each record's fields, which are its attributes (mypy refuses any other)."""
    return [dict(vars(s)) for s in steps]


def finished_rows(run: RunRecord, started_written: bool) -> list[Row]:
    """What recording a finished run writes: its row, steps included (inserted whole, or
    updated if its start was written)."""
    rows: list[Row] = []
    if started_written:
        rows.append(
            (
                UPDATE,
                _FINISH_RUN,
                {
                    "run_key": run.id,
                    "status": str(run.status),  # a plain str: sqlite3 binds a str enum the slow way
                    "finished_at": run.finished_at,
                    "outputs": run.outputs,
                    "response": run.response,
                    "error": run.error,
                    "steps": _steps_json(run.steps),
                },
            )
        )
    else:
        rows.append((INSERT, _INSERT_RUN, _run_row(run)))
    return rows


def _utc(value: datetime) -> datetime:
    """SQLite keeps no time zone: the times written are UTC, so read them back as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _step_of_json(data: dict[str, Any]) -> StepRecord:
    fields: dict[str, Any] = {c: data.get(c) for c in _STEP_COLUMNS}
    step = StepRecord(**fields)
    step.started_at = _utc(datetime.fromisoformat(data["started_at"]))
    return step


def _step(row: Any) -> StepRecord:
    step = StepRecord(**{c: row[c] for c in _STEP_COLUMNS})
    step.started_at = _utc(step.started_at)
    return step


def _run(row: Any) -> RunRecord:
    return RunRecord(
        id=row["id"],
        flow=row["flow"],
        status=row["status"],
        trigger=row["trigger"],
        inputs=row["inputs"],
        started_at=_utc(row["started_at"]),
        finished_at=_utc(row["finished_at"]) if row["finished_at"] is not None else None,
        outputs=row["outputs"],
        response=row["response"],
        error=row["error"],
        user=row["user"],
        parent_id=row["parent_id"],
    )
