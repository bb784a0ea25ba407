"""Expired dedupe keys are purged by the server's housekeeping, so the table stays small."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from flowrunner.store.crypto import TokenCipher
from flowrunner.store.database import Database
from flowrunner.store.queue import Dedupe, QueuedRun, RunQueue
from flowrunner.store.schema import dedupe_keys


def test_purge_removes_only_expired_dedupe_keys(tmp_path: Path) -> None:
    """Keys past their window are deleted; live ones stay and still refuse a duplicate."""
    database = Database.open(f"sqlite:///{tmp_path / 'state.db'}")
    queue = RunQueue(database, TokenCipher.from_passphrase("k"), node="n1")
    now = datetime.now(UTC)
    for index, window in enumerate((timedelta(seconds=-1), timedelta(hours=1))):
        run = QueuedRun(f"run-{index}", "flow", {}, {}, None, now)
        queue.enqueue_now(run, Dedupe("webhook:flow", f"key-{index}", window))
    assert queue.purge_expired_keys() == 1
    with database.engine.connect() as conn:
        remaining = conn.execute(select(dedupe_keys.c.key)).scalars().all()
        count = conn.execute(select(func.count()).select_from(dedupe_keys)).scalar()
    assert remaining == ["key-1"] and count == 1
    database.close()
