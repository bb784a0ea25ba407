"""Group commit: the writes of runs that end (or arrive) at the same moment share one
transaction, with one ``executemany`` per statement.

Under load, a webhook's intake row, the history of the runs that just ended and the
intake rows they no longer need are written together, instead of one transaction each:
on SQLite a transaction costs far more than a row. A write is submitted on the event loop;
whoever needs it durable (an intake before its 2xx, a run's history before ``flowrunner
run`` exits) awaits its future.

The transactions are run by a writer thread, one at a time, so that the event loop never
waits for the disk: after a checkpoint, SQLite's next commit restarts its log and syncs
it, which held the loop for 40-60 ms here. What is submitted while a transaction is in
flight goes into the next one, which starts as soon as it is done: the busier the disk,
the larger the batches. A lone write while no commit can wait for the disk is committed
on the loop itself, which costs less than the hand-off (see ``InlineCommits``).

If the shared transaction fails (a duplicate key, say), every write in it is retried
alone, so one bad write fails only its own future.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Dialect, Engine, PoolProxiedConnection, String
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import Executable, sqltypes
from sqlalchemy.types import TypeEngine

from flowrunner.store.wal import LogIndex

log = logging.getLogger("flowrunner.store")

# The order in which statements of one batch run: inserts, then updates of rows that may
# have been inserted in the same batch, then deletes (a finished run's intake row).
INSERT, UPDATE, DELETE = 0, 1, 2

Row = tuple[int, Executable, dict[str, Any]]

# A lone write with more text than this is the writer thread's, whatever the log: its
# pages could fill SQLite's page cache, which then writes them to the log before the
# commit (restarting it if it was all copied), before the loop has looked at the log.
INLINE_MAX_BYTES = 256 * 1024


def _by_order(group: tuple[tuple[int, Executable], list[dict[str, Any]]]) -> int:
    return group[0][0]


@dataclass(eq=False)  # compared by identity: a deferred write is found and taken back
class _Write:
    rows: Sequence[Row]
    alone: Callable[[Connection], Any] | None
    future: asyncio.Future[Any] | None
    due: asyncio.TimerHandle | None = None  # a deferred write's latest hand-off
    # A deferred write's rows, made only once it is handed off: most are taken back.
    make_rows: Callable[[], Sequence[Row]] | None = None


class Deferred:
    """A write that joins whatever commit comes next, and is handed off by itself only
    after a delay; until it is handed off it can be taken back (``take_back``). ``written``
    resolves once it is committed."""

    def __init__(self, batcher: WriteBatcher, write: _Write, written: asyncio.Future[Any]) -> None:
        self._batcher = batcher
        self._write = write
        self.written = written
        self.written.add_done_callback(_log_failure)

    def take_back(self, instead: asyncio.Future[Any] | None = None) -> bool:
        """Take the write back if it was not handed off yet: True if so (it will not be
        written), False if it is committed or on its way. What was taken back is replaced
        by ``instead`` (another write that makes it needless): ``written`` resolves with
        it, or at once without it."""
        if not self._batcher._take_back(self._write):
            return False
        if instead is None:
            self.written.set_result(None)
        else:
            instead.add_done_callback(self._follow)
        return True

    def _follow(self, instead: asyncio.Future[Any]) -> None:
        if self.written.done():
            return
        if instead.cancelled():
            self.written.cancel()
        elif (error := instead.exception()) is not None:
            self.written.set_exception(error)
        else:
            self.written.set_result(None)


def _log_failure(future: asyncio.Future[Any]) -> None:
    # A deferred write may have nobody awaiting it: its failure is logged here.
    if not future.cancelled() and (error := future.exception()) is not None:
        log.error("a deferred write to the state store failed: %s", error)


# A future, and the result or the error it is to be given.
_Outcome = tuple[asyncio.Future[Any], Any, Exception | None]


def _resolve(outcomes: list[_Outcome]) -> None:
    """Give each future its result or error (on its loop's thread), unless it is done."""
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _all_failed(writes: list[_Write], exc: BaseException) -> list[_Outcome]:
    """Every waiting write given the error (an exception, for what is not one)."""
    error = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
    return [(write.future, None, error) for write in writes if write.future is not None]


def _text_bytes(statements: list[tuple[str, list[Any]]]) -> int:
    """About how many bytes the statements' values take (text and blobs)."""
    size = 0
    for _, params in statements:
        for values in params:
            for value in values.values() if isinstance(values, dict) else values:
                if isinstance(value, str | bytes):
                    size += len(value)
    return size


def _on_their_way(writes: list[_Write]) -> list[_Write]:
    """The writes are on their way to the disk (on the event loop's thread): no deferred
    one waits for its delay any more, and each has its rows. A write whose rows cannot be
    made fails alone, and is left out."""
    ready: list[_Write] = []
    for write in writes:
        if write.due is not None:
            write.due.cancel()
            write.due = None
        if write.make_rows is not None:
            try:
                write.rows = write.make_rows()
            except Exception as exc:
                if write.future is not None and not write.future.done():
                    write.future.set_exception(exc)
                continue
            write.make_rows = None
        ready.append(write)
    return ready


class InlineCommits:
    """Whether the event loop may commit a lone write itself, rather than hand it to the
    writer thread.

    The hand-off costs two thread switches and a wake-up of the loop, more than a small
    commit does: with one client at a time, committing on the loop took about a twentieth
    less CPU a webhook, and half the thread switches. But some commits wait for the disk,
    and those must not be the loop's:

    - the first commit after a checkpoint that copied the whole log restarts the log, and
      syncs it;
    - past ``wal_autocheckpoint`` frames, a commit checkpoints;
    - while another connection writes (a prune), a commit waits for its lock.

    So the loop commits only while it can read the log's index (a SQLite file, with the
    checkpoint thread keeping a connection to it: ``log``) and no other connection writes
    (``outside``); only a write of modest size (``INLINE_MAX_BYTES``); and only if the log
    is neither all copied nor near the checkpoint size (``log_quiet``), looked at before
    the transaction (to skip it) and once it holds SQLite's write lock (else it rolls
    back and hands the write off). That look is exact: under the write lock no other commit
    changes the log, and a checkpoint only copies more of it. If the log was all copied
    when the transaction began (the case in which its commit restarts the log), it still
    is; if it is not all copied now, this commit does not restart it. A checkpoint running
    meanwhile does not matter: it never makes a commit wait."""

    def __init__(self, max_log_frames: int) -> None:
        self.max_log_frames = max_log_frames
        self.log: LogIndex | None = None  # set while the checkpoint thread runs
        self._outside = 0  # writes of other connections under way
        self._outside_lock = threading.Lock()

    def open(self) -> bool:
        return self.log is not None and not self._outside

    def log_frames(self) -> tuple[int, int] | None:
        """The frames in the log and those copied, while the log's index can be read."""
        log = self.log
        return log.frames() if log is not None else None

    def log_quiet(self) -> bool:
        """Inside a transaction that holds the write lock: whether its commit neither
        restarts nor checkpoints the log."""
        frames = self.log_frames()
        if frames is None:
            return False
        in_log, copied = frames
        return copied < in_log < self.max_log_frames

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Around writes of other connections (a prune, from a thread of its own): they
        hold SQLite's write lock, and a commit on the loop would wait for it."""
        with self._outside_lock:
            self._outside += 1
        try:
            yield
        finally:
            with self._outside_lock:
                self._outside -= 1


@dataclass
class _Batch:
    """Writes handed to the writer thread: their outcomes go back to ``loop``, or to a
    synchronous flush waiting on ``done``."""

    writes: list[_Write]
    loop: asyncio.AbstractEventLoop | None
    done: threading.Event | None = None
    outcomes: list[_Outcome] = field(default_factory=list)


@dataclass(frozen=True)
class _Prepared:
    """A statement compiled for the driver, with the bind processor of each parameter."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    positional: bool

    @classmethod
    def of(cls, statement: Executable, keys: tuple[str, ...], dialect: Dialect) -> _Prepared:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]
        names = tuple(compiled.positiontup if compiled.positional else compiled.binds)
        processors = tuple(_bind_processor(compiled.binds[name].type, dialect) for name in names)
        return cls(compiled.string, names, processors, bool(compiled.positional))

    def values(self, row: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        processed = [
            row[name] if process is None else process(row[name])
            for name, process in zip(self.names, self.processors, strict=True)
        ]
        if self.positional:
            return tuple(processed)
        return dict(zip(self.names, processed, strict=True))


def _bind_processor(type_: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """The column type's bind processor, or a quicker one that writes the same text: a
    run's row goes through a dozen of them, each called through several frames.

    - JSON: the dialect's serializer itself (SQLAlchemy's wrapper adds only the
      ``JSON.NULL`` sentinel, which flowrunner never writes; None is ``null``);
    - SQLite's DATETIME in its default format: ``isoformat``, the same digits."""
    impl = type_.dialect_impl(dialect)
    process = impl.bind_processor(dialect)
    serializer = getattr(dialect, "_json_serializer", None)
    if (
        isinstance(impl, sqltypes.JSON)
        and not impl.none_as_null
        and serializer is not None
        and String().bind_processor(dialect) is None
    ):
        return cast(Callable[[Any], Any], serializer)
    if (
        process is not None
        and isinstance(impl, sqlite.DATETIME)
        and impl._storage_format == sqlite.DATETIME._storage_format
    ):
        return functools.partial(_datetime_text, process)
    return process


# The text of the seconds last written, "2026-11-23 08:36:00.", by (year, ..., second):
# formatting a datetime costs ~3 us here, and a run's row has two, most often in the
# same second as the row before.
_SECONDS: dict[tuple[int, int, int, int, int, int], str] = {}
_SECONDS_KEPT = 64
_THREE_DIGITS = tuple(f"{n:03d}" for n in range(1000))


def _datetime_text(process: Callable[[Any], Any], value: Any) -> Any:
    if type(value) is datetime and 1000 <= value.year:
        # "2026-11-23 08:36:00.000000": what "%(year)04d-...%(microsecond)06d" gives.
        second = (value.year, value.month, value.day, value.hour, value.minute, value.second)
        text = _SECONDS.get(second)
        if text is None:
            if len(_SECONDS) >= _SECONDS_KEPT:
                _SECONDS.clear()
            text = _SECONDS[second] = value.isoformat(" ", "seconds")[:19] + "."
        micro = value.microsecond
        return text + _THREE_DIGITS[micro // 1000] + _THREE_DIGITS[micro % 1000]
    return process(value)  # a date, None, or what it refuses


class WriteBatcher:
    def __init__(self, engine: Engine, max_inline_log_frames: int = 0) -> None:
        self.engine = engine
        self.inline = InlineCommits(max_inline_log_frames)
        self._pending: list[_Write] = []
        self._scheduled: asyncio.Handle | None = None
        self._prepared: dict[tuple[Executable, tuple[str, ...]], _Prepared] = {}
        self._connection: PoolProxiedConnection | None = None
        self._closed = False
        # One transaction at a time on the connection: synchronous paths may write from
        # another thread than the event loop's.
        self._lock = threading.Lock()
        # Since start: transactions committed, and the writes they carried (the metrics).
        self.commits = 0
        self.written = 0
        self._counting = threading.Lock()
        # The writer thread, started on the first hand-off, and whether a batch is with it.
        self._batches: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._busy: asyncio.AbstractEventLoop | None = None  # the loop of the batch with it
        self._handed = 0  # how many writes that batch carries

    def submit(
        self, rows: Sequence[Row], alone: Callable[[Connection], Any] | None = None
    ) -> asyncio.Future[Any]:
        """Queue ``rows`` for the next group commit; the future resolves once they are
        committed. ``alone`` is how to do this write by itself when the shared transaction
        fails (default: the same rows); its return value becomes the future's result, and
        what it raises (e.g. a Duplicate) the future's exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._add(_Write(rows, alone, future), loop)
        return future

    def submit_deferred(self, make_rows: Callable[[], Sequence[Row]], within: float) -> Deferred:
        """Queue the rows ``make_rows`` gives to ride along with the next commit that
        happens anyway; if none has come within ``within`` seconds, they are committed by
        themselves. Until then the caller may take them back (``Deferred.take_back``), and
        they are not made at all."""
        loop = asyncio.get_running_loop()
        written: asyncio.Future[Any] = loop.create_future()
        write = _Write((), None, written, make_rows=make_rows)
        self._pending.append(write)
        write.due = loop.call_later(within, self._due, write, loop)
        return Deferred(self, write, written)

    def _due(self, write: _Write, loop: asyncio.AbstractEventLoop) -> None:
        write.due = None
        if write in self._pending:
            self._schedule_hand_off(loop)

    def _take_back(self, write: _Write) -> bool:
        if write.due is not None:
            write.due.cancel()
            write.due = None
        try:
            self._pending.remove(write)
        except ValueError:
            return False
        return True

    def submit_later(self, rows: Sequence[Row]) -> None:
        """Queue rows nobody waits for (a failure is logged): they ride along with the
        next commit. Outside an event loop they are written at once."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_alone(_Write(rows, None, None))
            return
        self._add(_Write(rows, None, None), loop)

    def _add(self, write: _Write, loop: asyncio.AbstractEventLoop) -> None:
        self._pending.append(write)
        self._schedule_hand_off(loop)

    def _schedule_hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
        """See that what is pending is handed off: at the loop's next turn, or when the
        writer is back."""
        if self._busy is not None and self._busy is not loop:
            # The batch with the writer belongs to a loop that is gone (a runtime used by
            # a second asyncio.run): its answer will never come back here.
            self._busy, self._handed = None, 0
        if self._scheduled is None and self._busy is None:
            # At the loop's next turn, after the callbacks already ready: everything the
            # runs in flight submit meanwhile joins this commit.
            self._scheduled = loop.call_soon(self._hand_off, loop)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No commit of this batcher's meanwhile (from another thread: the checkpoint's).
        The loop hands its lone writes to the writer thread, which waits for the end of
        this; one the loop had begun already ends first. (A synchronous ``write_now``
        waits too, and writes on other connections are not held.)"""
        with self.inline.outside(), self._lock:
            yield

    @property
    def pending(self) -> int:
        """Writes not committed yet: waiting, or with the writer thread."""
        return len(self._pending) + self._handed

    def _hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give what is pending to the writer thread (on the event loop)."""
        self._scheduled = None
        writes, self._pending = self._pending, []
        writes = _on_their_way(writes)
        if not writes:
            return
        if self._closed:
            # A write after close (a timer firing during shutdown): no thread is started
            # again for it; it is committed here, on a connection of its own.
            self._write_here(writes)
            return
        if (
            len(writes) == 1
            and writes[0].alone is None  # (else a duplicate is looked up, on the loop)
            and self.inline.open()
            and self._commit_here(writes[0])
        ):
            return  # a lone write while the disk is quiet (see InlineCommits)
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(
                target=self._write_batches, name="state-writer", daemon=True
            )
            self._writer.start()
        self._busy, self._handed = loop, len(writes)
        self._batches.put(_Batch(writes, loop))

    def _write_here(self, writes: list[_Write]) -> None:
        """Commit the writes on the loop, and resolve their futures."""
        try:
            outcomes = self._write(writes)
        except BaseException as exc:  # a bug of ours, or an interrupt: nobody waits forever
            _resolve(_all_failed(writes, exc))
            raise
        _resolve(outcomes)

    def _commit_here(self, write: _Write) -> bool:
        """Commit a lone write on the loop, unless its commit could wait for the disk:
        False then, with nothing written (the writer thread commits it). A write that
        fails here fails: it had a transaction of its own, which is what a retry alone
        would be."""
        try:
            if not self._commit(write.rows, only_if_quiet=True):
                return False
        except Exception as exc:
            if write.future is None:
                log.exception("a deferred write to the state store failed")
            else:
                _resolve([(write.future, None, exc)])
            return True
        except BaseException as exc:  # an interrupt: nobody waits forever
            _resolve(_all_failed([write], exc))
            raise
        self._count(written=1)
        if write.future is not None:
            _resolve([(write.future, None, None)])
        return True

    def _write_batches(self) -> None:
        """The writer thread: one transaction at a time, its outcome sent to the loop (or
        to a synchronous flush waiting for it)."""
        while (batch := self._batches.get()) is not None:
            try:
                batch.outcomes = self._write(batch.writes)
            except BaseException as exc:  # a bug of ours: every waiting write hears of it
                log.exception("the state store's writer failed")
                batch.outcomes = _all_failed(batch.writes, exc)
            if batch.done is not None:
                batch.done.set()
            elif batch.loop is not None:
                try:
                    batch.loop.call_soon_threadsafe(self._written, batch.loop, batch.outcomes)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass

    def _written(self, loop: asyncio.AbstractEventLoop, outcomes: list[_Outcome]) -> None:
        """Back on the loop: resolve the futures, and hand off what came meanwhile."""
        if self._busy is loop:
            self._busy, self._handed = None, 0
        _resolve(outcomes)
        if self._pending and self._scheduled is None and self._busy is None:
            self._scheduled = loop.call_soon(self._hand_off, loop)

    def flush(self) -> None:
        """Commit everything pending now and wait for it (what shutdown calls), after the
        batch the writer thread may hold: writes are committed in the order submitted."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        writes, self._pending = self._pending, []
        writes = _on_their_way(writes)
        if not writes:
            return
        if self._writer is not None and self._writer.is_alive():
            batch = _Batch(writes, None, threading.Event())
            self._batches.put(batch)
            batch.done.wait()  # type: ignore[union-attr]
            _resolve(batch.outcomes)
        else:
            _resolve(self._write(writes))

    def _write(self, writes: list[_Write]) -> list[_Outcome]:
        """Commit the writes together, or each alone if that fails; what each future is to
        be given. Touches no future (it may run on the writer thread)."""
        try:
            self._commit([row for write in writes for row in write.rows])
        except Exception:
            if len(writes) > 1:
                log.debug("a group commit failed; writing its %d writes one by one", len(writes))
            outcomes: list[_Outcome] = []
            for write in writes:
                result, error = self._write_alone(write)
                if write.future is not None:
                    outcomes.append((write.future, result, error))
            return outcomes
        self._count(written=len(writes))
        return [(write.future, None, None) for write in writes if write.future is not None]

    def write_now(self, rows: Sequence[Row]) -> None:
        """Write ``rows`` now, in a transaction of their own (outside the group commits:
        the synchronous paths, such as recovery at start-up)."""
        self._commit(rows)
        self._count(written=1)

    def _count(self, commits: int = 0, written: int = 0) -> None:
        # Both threads count (the writer, and the loop's synchronous paths).
        with self._counting:
            self.commits += commits
            self.written += written

    def close(self) -> None:
        """Commit what is pending, stop the writer thread and give the connection back to
        the pool. A write that still comes (a timer firing during shutdown) opens a
        connection for itself."""
        self.flush()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._batches.put(None)
            writer.join(timeout=30)
        with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()

    def _commit(self, rows: Sequence[Row], only_if_quiet: bool = False) -> bool:
        """One transaction: one ``executemany`` per statement, in the rows' order (INSERT
        before UPDATE before DELETE), on a connection kept for these writes. With
        ``only_if_quiet`` (on the loop), rolled back instead of committed if the commit
        would restart or checkpoint the log (see InlineCommits): False then.

        It is the driver's connection, under SQLAlchemy's pool but not its Connection: a
        transaction through SQLAlchemy costs about as much again as SQLite's own work. The
        statements are compiled by SQLAlchemy once, and each value goes through its column
        type's own bind processor (JSON, dates), so the stored text is the same."""
        groups: dict[tuple[int, Executable], list[dict[str, Any]]] = {}
        for order, statement, row in rows:
            groups.setdefault((order, statement), []).append(row)
        statements: list[tuple[str, list[Any]]] = []
        for (_, statement), many in sorted(groups.items(), key=_by_order):
            prepared = self._prepare(statement, tuple(many[0]))
            statements.append((prepared.sql, [prepared.values(row) for row in many]))
        if only_if_quiet and (
            not self.inline.log_quiet() or _text_bytes(statements) > INLINE_MAX_BYTES
        ):
            return False  # not worth a transaction to roll back
        with self._lock:
            connection = self._connection or self._connect()
            try:
                cursor = connection.cursor()
                try:
                    for sql, params in statements:
                        cursor.executemany(sql, params)
                finally:
                    cursor.close()
                if only_if_quiet and not self.inline.log_quiet():  # now under the write lock
                    self._rollback(connection)
                    return False
                connection.commit()
                self._count(commits=1)
            except BaseException:
                self._rollback(connection)
                raise
            finally:
                if self._closed and self._connection is not None:
                    self._connection = None
                    connection.close()
        return True

    def _connect(self) -> PoolProxiedConnection:
        self._connection = self.engine.raw_connection()
        return self._connection

    def _rollback(self, connection: PoolProxiedConnection) -> None:
        try:
            connection.rollback()
        except Exception:
            # Not usable any more: the pool drops it, and the next commit opens another.
            self._connection = None
            connection.invalidate()

    def _prepare(self, statement: Executable, keys: tuple[str, ...]) -> _Prepared:
        key = (statement, keys)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = _Prepared.of(statement, keys, self.engine.dialect)
        return prepared

    def _write_alone(self, write: _Write) -> tuple[Any, Exception | None]:
        """Do one write in a transaction of its own: its result, or what it raised."""
        result = None
        try:
            if write.alone is None:
                self._commit(write.rows)
            else:
                with self.engine.begin() as conn:
                    result = write.alone(conn)
                self._count(commits=1)
        except Exception as exc:
            if write.future is None:
                log.exception("a deferred write to the state store failed")
            return None, exc
        self._count(written=1)
        return result, None
