"""The run queue in the state database: durable intake, claims, and dedupe keys.

The interface is small on purpose (enqueue, claim, finish, recover) so that a
Procrastinate-backed queue can take its place when flowrunner runs on several nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from flowrunner.store.batch import DELETE, INSERT, Deferred, Row
from flowrunner.store.crypto import TokenCipher
from flowrunner.store.database import Database
from flowrunner.store.schema import dedupe_keys, run_queue


@dataclass
class QueuedRun:
    id: str
    flow: str
    trigger: dict[str, Any]
    inputs: dict[str, Any]
    user_token: str | None
    created_at: datetime


@dataclass(frozen=True)
class Dedupe:
    scope: str
    key: str
    window: timedelta


class Duplicate(Exception):
    """The dedupe key was seen within its window; ``run_id`` is the first run's."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


# Request headers that carry credentials: encrypted in the intake row like the user token
# (the run needs them, e.g. a connected_user profile reads trigger.headers.authorization).
SEALED_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})
_SEALED = "$sealed"


def _key_row(run_id: str, dedupe: Dedupe, now: datetime) -> dict[str, Any]:
    return {
        "scope": dedupe.scope,
        "key": dedupe.key,
        "run_id": run_id,
        "expires_at": now + dedupe.window,
    }


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_INSERT_QUEUED = insert(run_queue)
_INSERT_KEY = insert(dedupe_keys)
_FINISH = delete(run_queue).where(run_queue.c.id == bindparam("run_key"))


class RunQueue:
    def __init__(self, database: Database, cipher: TokenCipher, node: str) -> None:
        self.engine = database.engine
        self.writes = database.writes
        self.cipher = cipher
        self.node = node

    async def enqueue(
        self, run: QueuedRun, dedupe: Dedupe | None = None, claim: bool = False
    ) -> str:
        """Store the run durably, with the next group commit; returns its id once it is
        committed. Raises Duplicate for a dedupe key seen within its window. With
        ``claim``, the row is stored already claimed by this node, which is about to
        start it: no second write on the common, idle path."""
        now = datetime.now(UTC)
        rows: list[Row] = [(INSERT, _INSERT_QUEUED, self._row(run, claim, now))]
        if dedupe is not None:
            # Optimistic: a new key is a plain insert. A key already there (a duplicate, or
            # an expired one to replace) fails the shared commit, and this write is done
            # again alone, by the careful path.
            rows.insert(0, (INSERT, _INSERT_KEY, _key_row(run.id, dedupe, now)))
        await self.writes.submit(rows, alone=lambda conn: self._enqueue(conn, run, dedupe, claim))
        return run.id

    def enqueue_started(self, run: QueuedRun, within: float) -> Deferred:
        """Store a run this node has already started (claimed), with the next commit that
        happens anyway or after ``within`` seconds, whichever comes first. A run that ends
        before takes its intake back (``Deferred.take_back``): its history is then its only
        write. No dedupe key: a duplicate must be refused before its run starts."""
        # Claimed as it was created: the run started at once.
        return self.writes.submit_deferred(
            lambda: [(INSERT, _INSERT_QUEUED, self._row(run, True, run.created_at))], within
        )

    def enqueue_now(self, run: QueuedRun, dedupe: Dedupe | None = None) -> str:
        """``enqueue`` in a transaction of its own, for callers outside the event loop."""
        with self.engine.begin() as conn:
            return self._enqueue(conn, run, dedupe, claim=False)

    def _enqueue(self, conn: Connection, run: QueuedRun, dedupe: Dedupe | None, claim: bool) -> str:
        now = datetime.now(UTC)
        if dedupe is not None:
            existing = conn.execute(
                select(dedupe_keys.c.run_id, dedupe_keys.c.expires_at)
                .where(dedupe_keys.c.scope == dedupe.scope)
                .where(dedupe_keys.c.key == dedupe.key)
            ).first()
            if existing is not None and _utc(existing.expires_at) > now:
                raise Duplicate(existing.run_id)
            if existing is not None:
                conn.execute(
                    delete(dedupe_keys)
                    .where(dedupe_keys.c.scope == dedupe.scope)
                    .where(dedupe_keys.c.key == dedupe.key)
                )
            try:
                conn.execute(_INSERT_KEY, _key_row(run.id, dedupe, now))
            except IntegrityError:
                # Another node or request took the key between our read and write.
                raise Duplicate(self._dedupe_owner(dedupe)) from None
        conn.execute(_INSERT_QUEUED, self._row(run, claim, now))
        return run.id

    def _row(self, run: QueuedRun, claim: bool, now: datetime) -> dict[str, Any]:
        return {
            "id": run.id,
            "flow": run.flow,
            "trigger": self._seal(run.trigger),
            "inputs": run.inputs,
            "user_token": self.cipher.encrypt(run.user_token),
            "status": "running" if claim else "queued",
            "node": self.node if claim else None,
            "created_at": run.created_at,
            "claimed_at": now if claim else None,
        }

    def _seal(self, trigger: dict[str, Any]) -> dict[str, Any]:
        headers = trigger.get("headers")
        if not isinstance(headers, dict):
            return trigger
        sealed = {
            name: {_SEALED: self.cipher.encrypt(value)}
            if str(name).lower() in SEALED_HEADERS and isinstance(value, str)
            else value
            for name, value in headers.items()
        }
        return {**trigger, "headers": sealed}

    def _unseal(self, trigger: dict[str, Any]) -> dict[str, Any]:
        headers = trigger.get("headers")
        if not isinstance(headers, dict):
            return trigger
        opened = {
            name: self.cipher.decrypt(value[_SEALED])
            if isinstance(value, dict) and _SEALED in value
            else value
            for name, value in headers.items()
        }
        return {**trigger, "headers": opened}

    def _dedupe_owner(self, dedupe: Dedupe) -> str:
        with self.engine.connect() as conn:
            owner = conn.execute(
                select(dedupe_keys.c.run_id)
                .where(dedupe_keys.c.scope == dedupe.scope)
                .where(dedupe_keys.c.key == dedupe.key)
            ).scalar()
        return str(owner or "")

    def claim(self, run_id: str) -> bool:
        """Take a queued run for this node; False when someone else took it."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(run_queue)
                .where(run_queue.c.id == run_id)
                .where(run_queue.c.status == "queued")
                .values(status="running", node=self.node, claimed_at=datetime.now(UTC))
            )
            return bool(result.rowcount)

    def claim_many(self, run_ids: list[str]) -> list[QueuedRun]:
        """Take several queued runs for this node in one statement; returns those this node
        got (another worker may have taken some), in the order asked."""
        if not run_ids:
            return []
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(run_queue)
                .where(run_queue.c.id.in_(run_ids))
                .where(run_queue.c.status == "queued")
                .values(status="running", node=self.node, claimed_at=datetime.now(UTC))
                .returning(*run_queue.c)
            ).fetchall()
        position = {run_id: index for index, run_id in enumerate(run_ids)}
        return sorted((self._queued(row) for row in rows), key=lambda run: position[run.id])

    def waiting(self, limit: int = 500) -> list[tuple[str, str]]:
        """(id, flow) of the queued runs, oldest first: what the dispatcher chooses from,
        without reading (and decrypting) every payload."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(run_queue.c.id, run_queue.c.flow)
                .where(run_queue.c.status == "queued")
                .order_by(run_queue.c.created_at, run_queue.c.id)
                .limit(limit)
            ).fetchall()
        return [(row.id, row.flow) for row in rows]

    def queued(self, limit: int = 500) -> list[QueuedRun]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(run_queue)
                .where(run_queue.c.status == "queued")
                .order_by(run_queue.c.created_at, run_queue.c.id)
                .limit(limit)
            ).fetchall()
        return [self._queued(row) for row in rows]

    def _queued(self, row: Any) -> QueuedRun:
        return QueuedRun(
            id=row.id,
            flow=row.flow,
            trigger=self._unseal(row.trigger),
            inputs=row.inputs,
            user_token=self.cipher.decrypt(row.user_token),
            created_at=_utc(row.created_at),
        )

    def finish(self, run_id: str) -> None:
        """The run is over and recorded in the history: the intake row has done its job."""
        with self.engine.begin() as conn:
            conn.execute(_FINISH, {"run_key": run_id})

    def finish_later(self, run_id: str) -> None:
        """``finish`` with the next group commit. Nothing waits for it: if the process
        dies first, the next start finds a finished run's row and removes it."""
        self.writes.submit_later(self.finish_rows(run_id))

    def finish_rows(self, run_id: str) -> list[Row]:
        """What ``finish`` writes, to join another write (the run's history)."""
        return [(DELETE, _FINISH, {"run_key": run_id})]

    def status(self, run_id: str) -> str | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(run_queue.c.status).where(run_queue.c.id == run_id)
            ).scalar()
        return str(value) if value is not None else None

    def active(self, flow: str) -> int:
        """Runs of ``flow`` queued or running, on any node."""
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.count()).select_from(run_queue).where(run_queue.c.flow == flow)
            ).scalar()
        return int(value or 0)

    def depth(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.count()).select_from(run_queue).where(run_queue.c.status == "queued")
            ).scalar()
        return int(value or 0)

    def abandoned(self, node: str | None = None) -> list[QueuedRun]:
        """Runs claimed by a process that died (this node's, on start). A run is claimed
        only as it starts, so each was in flight: the caller records it as interrupted and
        removes its row (a crash during that leaves the row claimed, for the next start)."""
        query = select(run_queue).where(run_queue.c.status == "running")
        if node is not None:
            query = query.where(run_queue.c.node == node)
        with self.engine.connect() as conn:
            return [self._queued(row) for row in conn.execute(query)]

    def purge_expired_keys(self) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(dedupe_keys).where(dedupe_keys.c.expires_at < datetime.now(UTC))
            )
            return int(result.rowcount or 0)
