"""Opening the database and bringing its schema up to date."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time as clock
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, PoolProxiedConnection, create_engine, event, select

from flowrunner import jsontext
from flowrunner.errors import ConfigurationError
from flowrunner.store.batch import WriteBatcher
from flowrunner.store.schema import LATEST_VERSION, MIGRATIONS, metadata, schema_version
from flowrunner.store.wal import LogIndex, sync_database

log = logging.getLogger("flowrunner.store")
STATE_DIR = ".flowrunner"
AUTOCHECKPOINT_PAGES = 10_000
# Under steady writes a checkpoint from the background thread never completes (commits
# add to the log while it copies), so the log restarts only at the writer's own
# checkpoint, at AUTOCHECKPOINT_PAGES, and that one copies what the thread has not yet:
# 40-110 ms of a commit held when the thread ran every second, about 15 ms at 0.25 s.
# Each checkpoint also takes the CPU from the event loop while it copies (one core):
# many small ones hold the loop less than a few large ones (W1's one-client p99: 5-12 ms
# at 0.25 s, 3 ms at 0.05 s). The thread skips a turn when the log's index says all of it
# is copied.
CHECKPOINT_SECONDS = 0.05
# The log restarts (its file written from the start again) only after a checkpoint that
# copied all of it, and with a commit about every millisecond (one client) the thread's
# checkpoint never does: commits land while it copies. The log then grew to
# AUTOCHECKPOINT_PAGES every two seconds or so; there the commits went to the writer
# thread, and one of them waited 7-13 ms for its checkpoint. So once the log has this many
# frames, the thread copies the frames left with this process's batched commits held, and
# the next commit restarts the log (usually the writer thread's: the loop hands off the
# first commit after a complete checkpoint). Every checkpoint syncs the log before it
# copies, but only one that completes syncs the database file, with all that the others
# copied since the last (4-14 ms): the thread syncs it first, unheld, and the hold then
# takes about 1.5 ms. At one client, W1's p99 was 5-8% lower with 6,000 frames than
# with 2,000 (fewer holds), and about as much again with the log synced first too (the
# frames written meanwhile).
RESTART_LOG_FRAMES = 6_000


# Each transaction of a long delete (pruning the history) aims at this long: the server's
# writes wait at most about that, and the delete pauses as long again between two.
DELETE_BUDGET_SECONDS = 0.02


def delete_in_batches(
    database: Database,
    delete_batch: Callable[[Connection, int], int],
    stop: threading.Event | None = None,
    first_batch: int = 10,
) -> int:
    """Delete in short transactions until done or ``stop`` is set; how many rows went.
    ``delete_batch(conn, n)`` deletes up to ``n`` rows and says how many it deleted; ``n``
    follows what a transaction took, to stay near ``DELETE_BUDGET_SECONDS`` (rows of very
    different sizes can make one transaction take several times that). Meanwhile the
    event loop commits nothing itself (see InlineCommits)."""
    with database.writes.inline.outside():
        return _delete_in_batches(database.engine, delete_batch, stop, first_batch)


def _delete_in_batches(
    engine: Engine,
    delete_batch: Callable[[Connection, int], int],
    stop: threading.Event | None,
    first_batch: int,
) -> int:
    removed, size = 0, first_batch
    while stop is None or not stop.is_set():
        started = clock.monotonic()
        with engine.begin() as conn:
            deleted = delete_batch(conn, size)
        removed += deleted
        if deleted < size:
            break
        took = clock.monotonic() - started
        # Towards the budget, growing at most twofold: one quick batch (its pages in the
        # cache) must not make the next a long one. One row at least, however large.
        size = max(1, min(2000, 2 * size, int(size * DELETE_BUDGET_SECONDS / max(took, 1e-3))))
        # A pause as long as the transaction: whoever waited for the lock gets it.
        if stop is not None:
            stop.wait(took)
        else:
            clock.sleep(took)
    return removed


def default_database_url(project_root: Path) -> str:
    return f"sqlite:///{project_root / STATE_DIR / 'state.db'}"


class Database:
    """One SQLAlchemy engine for the process; every store module runs its SQL through it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The loop may commit itself while the log is well under the size at which a
        # commit checkpoints (see InlineCommits): a lone write adds a handful of pages.
        self.writes = WriteBatcher(engine, max_inline_log_frames=AUTOCHECKPOINT_PAGES * 9 // 10)
        self._checkpoints: threading.Event | None = None
        self._checkpointer: threading.Thread | None = None

    def checkpoint_in_background(
        self, every: float = CHECKPOINT_SECONDS, restart_at: int = RESTART_LOG_FRAMES
    ) -> None:
        """SQLite: copy the write-ahead log into the database from a thread, every
        ``every`` seconds, so that no commit on the event loop has to (a long-running
        process calls this; short commands never fill the log). Meanwhile the loop may
        commit lone writes itself (see InlineCommits): the thread's connection keeps the
        log's index there to read. Once the log has ``restart_at`` frames, the thread
        finishes the copy with this process's commits held, so that the log restarts
        (``RESTART_LOG_FRAMES``; 0: never)."""
        path = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not path or path == ":memory:":
            return
        if self._checkpoints is not None:
            return
        stop = self._checkpoints = threading.Event()
        gate = self.writes.inline
        opened = threading.Event()

        def connect() -> PoolProxiedConnection:
            # While the thread's connection is open, SQLite keeps the log's index open,
            # and the loop reads it through SQLite's descriptor (see LogIndex).
            connection = self.engine.raw_connection()
            gate.log = LogIndex(Path(path))
            return connection

        def forget_log() -> None:
            log_index, gate.log = gate.log, None
            if log_index is not None:
                log_index.close()

        def checkpoint() -> None:
            # A connection of the thread's own, kept: taking one from the pool at each
            # turn cost a tenth of the checkpoint.
            connection: PoolProxiedConnection | None = None
            try:
                connection = connect()
            except Exception:
                log.exception("opening the state database to checkpoint it failed")
            opened.set()
            hold_at = restart_at
            while not stop.wait(every):
                frames = gate.log_frames()
                if frames is not None and frames[0] == frames[1]:
                    continue  # the whole log is copied already, whoever wrote it
                try:
                    connection = connection or connect()
                    cursor = connection.cursor()
                    try:
                        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                        frames = gate.log_frames()
                        if frames is not None and frames[0] < restart_at:
                            hold_at = restart_at  # (the log restarted)
                        if frames is not None and frames[1] < frames[0] >= hold_at > 0:
                            # The checkpoint that copies the last frames syncs the
                            # database: most of what that writes goes first, unheld.
                            sync_database(Path(path))
                            with self.writes.held():
                                _, in_log, copied = cursor.execute(
                                    "PRAGMA wal_checkpoint(PASSIVE)"
                                ).fetchone()
                            if copied < in_log:
                                # A reader of an older state (another process), or a
                                # write of another connection, kept frames from it: not
                                # again at each turn, but once the log has grown by a
                                # quarter as much (well before the loop stops committing).
                                hold_at = in_log + max(1, restart_at // 4)
                    finally:
                        cursor.close()
                except Exception:
                    log.exception("checkpointing the state database failed")
                    forget_log()
                    if connection is not None:
                        connection.invalidate()  # the next turn opens another
                        connection = None
            forget_log()
            if connection is not None:
                connection.close()

        self._checkpointer = threading.Thread(
            target=checkpoint, name="state-checkpoint", daemon=True
        )
        self._checkpointer.start()
        opened.wait(timeout=5)

    @classmethod
    def open(cls, url: str) -> Database:
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        try:
            # Outputs may hold dates and times: stored as ISO text rather than failing.
            engine = create_engine(url, json_serializer=_json_dumps, **kwargs)
        except Exception as exc:  # a malformed URL or a missing driver
            raise ConfigurationError(f"cannot open the state database: {exc}") from exc
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
            # sqlite3 binds an exact int, float, str or bytes as it is; for anything else,
            # None included, it first looks for an adapter, raising and catching two
            # AttributeErrors on the way: a run's row has three Nones, and that was a
            # twentieth of its insert. An adapter registered for None is one look-up.
            sqlite3.register_adapter(type(None), _NONE)
        database = cls(engine)
        database.migrate()
        return database

    def migrate(self) -> None:
        with self.engine.begin() as conn:
            schema_version.create(conn, checkfirst=True)
            current = conn.execute(select(schema_version.c.version)).scalar()
            if current is None:
                conn.execute(schema_version.insert().values(version=0))
                current = 0
            if current > LATEST_VERSION:
                raise ConfigurationError(
                    f"the state database is at schema version {current}, newer than this "
                    f"flowrunner ({LATEST_VERSION}); upgrade flowrunner"
                )
            for version in range(current, LATEST_VERSION):
                migration = MIGRATIONS[version]
                if callable(migration):
                    migration(conn)
                else:
                    metadata.create_all(conn, tables=migration)
                conn.execute(schema_version.update().values(version=version + 1))

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.set()
        if self._checkpointer is not None:
            # It gives its connection back before the pool is disposed of.
            self._checkpointer.join(timeout=5)
        self.writes.close()
        self.engine.dispose()


_NONE: Callable[[Any], Any] = {}.get  # None for None, without a Python frame


def _json_dumps(value: Any) -> str:
    # The history writes a dozen JSON columns per run: orjson, see flowrunner.jsontext.
    return jsontext.dumps(value, _json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the CLI, the UI) work while the server writes; NORMAL sync is
    # durable across process crashes, which is what run history needs.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # A checkpoint copies the log into the database and syncs it to disk: done by whoever
    # commits when the log is full, that stalls the commit. The server checkpoints from a
    # thread of its own (see checkpoint_in_background, CHECKPOINT_SECONDS); this larger
    # limit (~40 MB) is when the writer restarts the log.
    cursor.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
