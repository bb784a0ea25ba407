"""How far SQLite's write-ahead log has grown and how much of it is copied, read from the
log's index (the ``-shm`` file next to the database) without a query.

The layout is SQLite's file format (https://www.sqlite.org/walformat.html), in the
machine's byte order: the index header comes twice, 48 bytes each, with the frames in the
log (``mxFrame``) at offset 16; then the checkpoint information, with the frames a
checkpoint has copied into the database (``nBackfill``) at offset 96.

SQLite's files are read and synced through the descriptors SQLite itself holds (found in
``/proc/self/fd``), never through one of our own: SQLite's locks are POSIX locks, and a
process that closes any descriptor of a file loses all its locks on that file. Closing a
descriptor of the index would drop the lock by which SQLite tells other processes that
the index is in use; the next process to open the database would then rebuild the index
under this one's connections. Elsewhere than Linux nothing is read (``frames`` gives
None) and nothing is synced.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

_FRAMES = 16  # mxFrame, in the first copy of the index header
_COPIED = 96  # nBackfill, in the checkpoint information after both copies
_HEADER_BYTES = 136
_U32 = struct.Struct("=I")
_OPEN_FILES = Path("/proc/self/fd")


def sqlite_descriptor(path: Path) -> int | None:
    """A descriptor this process has open on ``path`` (a real path, not a link), or None."""
    try:
        descriptors = os.listdir(_OPEN_FILES)
    except OSError:  # not Linux
        return None
    target = str(path)
    for name in descriptors:
        try:
            if os.readlink(_OPEN_FILES / name) == target:
                return int(name)
        except (OSError, ValueError):  # closed meanwhile
            continue
    return None


def sync_database(database_path: Path) -> bool:
    """Flush the database file and its log to the disk, through SQLite's descriptors;
    whether there was something to sync. Done before a checkpoint that is to complete:
    its own syncs of both files then have little left to write."""
    real = Path(os.path.realpath(database_path))  # what /proc/self/fd shows
    synced = False
    for path in (real, real.with_name(real.name + "-wal")):
        descriptor = sqlite_descriptor(path)
        if descriptor is None:
            continue
        try:
            os.fdatasync(descriptor)
        except OSError:  # closed meanwhile (or its number given to another file: harmless)
            continue
        synced = True
    return synced


class LogIndex:
    """The index of one database's log, read through SQLite's own descriptor of it.

    SQLite keeps that descriptor while a connection to the database is open, so whoever
    reads it keeps one open meanwhile (the checkpoint thread does). Read after SQLite
    closed it, it gives None; were its number given to another file meanwhile, the
    numbers read would be wrong, which only changes which thread commits a write and
    when the checkpoint thread checkpoints, never what is written."""

    def __init__(self, database_path: Path) -> None:
        # SQLite puts the index next to the real file, not next to a link to it.
        real = Path(os.path.realpath(database_path))
        self.path = real.with_name(real.name + "-shm")
        self._descriptor: int | None = None
        self._closed = False

    def frames(self) -> tuple[int, int] | None:
        """The frames in the log and how many of them are copied into the database, or
        None while there is no index to read (no connection opened the log yet, or the
        database is not in WAL mode)."""
        if self._closed:
            return None
        descriptor = self._descriptor
        if descriptor is None:
            descriptor = self._descriptor = sqlite_descriptor(self.path)
            if descriptor is None:
                return None
        try:
            header = os.pread(descriptor, _HEADER_BYTES, 0)
        except OSError:  # SQLite closed it: look for it again next time
            self._descriptor = None
            return None
        if len(header) < _HEADER_BYTES:  # not written yet
            return None
        return _U32.unpack_from(header, _FRAMES)[0], _U32.unpack_from(header, _COPIED)[0]

    def close(self) -> None:
        self._closed = True
        self._descriptor = None
