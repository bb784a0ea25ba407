"""SQLite's write-ahead log, outside the state store's SQLAlchemy: how far the log has
grown and how much of it is copied (``LogIndex``), and the process that copies it into
the database in the background (``run``). Only the standard library: the checkpoint
process imports nothing else.

    python -m flowrunner.sqlitelog DATABASE_PATH EVERY_SECONDS

Every ``EVERY_SECONDS`` it copies SQLite's write-ahead log into the database (a passive
checkpoint: it never makes a commit wait), so that the server's commits never have to.
It quits when its standard input closes: when the server that started it stops, or dies.

Why a process, idle-class (Linux's ``SCHED_IDLE``): a checkpoint copies pages for a few
hundred microseconds of CPU, and on the server's core that time was the event loop's. At
the lowest priority the checkpoint runs only while the loop waits, and the loop takes
the core back the moment it has work. A thread of the server's could not do that: it
shares the server's GIL, so the loop, ready to run, would wait for a starved thread that
holds it. With one client at a time, this cut the server's p99 by about a sixth (2.8-2.9
against 3.5-5.6 ms in alternating rounds; a process at normal priority: no change).

Under a load that leaves the core no idle time, the checkpoints fall behind; then the
commit that passes ``wal_autocheckpoint`` checkpoints the log itself (the writer
thread's: see ``InlineCommits``).

The log's index is the ``-shm`` file next to the database; its layout is SQLite's file
format (https://www.sqlite.org/walformat.html), in the machine's byte order: the index
header comes twice, 48 bytes each, with the frames in the log (``mxFrame``) at offset
16; then the checkpoint information, with the frames a checkpoint has copied into the
database (``nBackfill``) at offset 96.
"""

from __future__ import annotations

import mmap
import os
import select
import sqlite3
import struct
import sys
from pathlib import Path

_FRAMES = 16  # mxFrame, in the first copy of the index header
_COPIED = 96  # nBackfill, in the checkpoint information after both copies
_HEADER_BYTES = 136
_U32 = struct.Struct("=I")


class LogIndex:
    """The index of one database's log, mapped once, read-only.

    The mapping is of the file as it was when first read: SQLite removes the file only
    when the last connection to the database closes, so whoever reads it keeps a
    connection open meanwhile (the state database keeps one)."""

    def __init__(self, database_path: Path) -> None:
        self.path = database_path.with_name(database_path.name + "-shm")
        self._map: mmap.mmap | None = None
        self._closed = False

    def frames(self) -> tuple[int, int] | None:
        """The frames in the log and how many of them are copied into the database, or
        None while there is no index to read (no connection opened the log yet, or the
        database is not in WAL mode)."""
        index = self._map or (None if self._closed else self._open())
        if index is None:
            return None
        return _U32.unpack_from(index, _FRAMES)[0], _U32.unpack_from(index, _COPIED)[0]

    def _open(self) -> mmap.mmap | None:
        try:
            with open(self.path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), _HEADER_BYTES, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # missing, or shorter than a header: not yet
            return None
        return self._map

    def close(self) -> None:
        self._closed = True
        index, self._map = self._map, None
        if index is not None:
            index.close()


def lower_priority() -> None:
    """The idle class where there is one (Linux); else the lowest nice value."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except (AttributeError, OSError):
            pass


def run(path: Path, every: float) -> None:
    lower_priority()
    index = LogIndex(path)
    connection = sqlite3.connect(path, isolation_level=None, timeout=30)
    # The server's setting, which a checkpoint's syncs follow: the log is synced before
    # its pages are copied, the database after.
    connection.execute("PRAGMA synchronous=NORMAL")
    try:
        while not _server_gone(every):
            frames = index.frames()
            if frames is not None and frames[0] == frames[1]:
                continue  # everything in the log is copied already, whoever wrote it
            try:
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:  # a locked or busy database: the next turn
                print(f"checkpointing {path} failed: {exc}", file=sys.stderr, flush=True)
    finally:
        index.close()
        connection.close()


def _server_gone(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds; True once standard input is closed."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(ready) and not os.read(sys.stdin.fileno(), 64)


if __name__ == "__main__":
    run(Path(sys.argv[1]), float(sys.argv[2]))
