"""How far SQLite's write-ahead log has grown and how much of it is copied, read from the
log's index (the ``-shm`` file next to the database) without a query.

The layout is SQLite's file format (https://www.sqlite.org/walformat.html), in the
machine's byte order: the index header comes twice, 48 bytes each, with the frames in the
log (``mxFrame``) at offset 16; then the checkpoint information, with the frames a
checkpoint has copied into the database (``nBackfill``) at offset 96.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

_FRAMES = 16  # mxFrame, in the first copy of the index header
_COPIED = 96  # nBackfill, in the checkpoint information after both copies
_HEADER_BYTES = 136
_U32 = struct.Struct("=I")


class LogIndex:
    """The index of one database's log, mapped once, read-only.

    The mapping is of the file as it was when first read: SQLite removes the file only
    when the last connection to the database closes, so whoever reads it keeps a
    connection open meanwhile (the checkpoint thread does)."""

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
