"""The run queue in the state database: durable intake, claims, and dedupe keys.

The interface is small on purpose (enqueue, claim, finish, recover) so that a
Procrastinate-backed queue can take its place when flowrunner runs on several nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

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


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_INSERT_QUEUED = insert(run_queue)
_FINISH = delete(run_queue).where(run_queue.c.id == bindparam("run_key"))


class RunQueue:
    def __init__(self, database: Database, cipher: TokenCipher, node: str) -> None:
        self.engine = database.engine
        self.cipher = cipher
        self.node = node

    def enqueue(self, run: QueuedRun, dedupe: Dedupe | None = None, claim: bool = False) -> str:
        """Store the run durably; returns its id. Raises Duplicate for a seen dedupe key.
        With ``claim``, the row is stored already claimed by this node, which is about to
        start it: one transaction instead of two on the common, idle path."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
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
                    conn.execute(
                        insert(dedupe_keys).values(
                            scope=dedupe.scope,
                            key=dedupe.key,
                            run_id=run.id,
                            expires_at=now + dedupe.window,
                        )
                    )
                except IntegrityError:
                    # Another node or request took the key between our read and write.
                    raise Duplicate(self._dedupe_owner(dedupe)) from None
            conn.execute(
                _INSERT_QUEUED,
                {
                    "id": run.id,
                    "flow": run.flow,
                    "trigger": self._seal(run.trigger),
                    "inputs": run.inputs,
                    "user_token": self.cipher.encrypt(run.user_token),
                    "status": "running" if claim else "queued",
                    "node": self.node if claim else None,
                    "created_at": run.created_at,
                    "claimed_at": now if claim else None,
                },
            )
        return run.id

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

    def queued(self, limit: int = 500) -> list[QueuedRun]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(run_queue)
                .where(run_queue.c.status == "queued")
                .order_by(run_queue.c.created_at, run_queue.c.id)
                .limit(limit)
            ).fetchall()
        return [
            QueuedRun(
                id=row.id,
                flow=row.flow,
                trigger=self._unseal(row.trigger),
                inputs=row.inputs,
                user_token=self.cipher.decrypt(row.user_token),
                created_at=_utc(row.created_at),
            )
            for row in rows
        ]

    def finish(self, run_id: str) -> None:
        """The run is over and recorded in the history: the intake row has done its job."""
        with self.engine.begin() as conn:
            conn.execute(_FINISH, {"run_key": run_id})

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

    def requeue_abandoned(self, node: str | None = None) -> list[str]:
        """Runs claimed by a process that died (this node's, on start): back to queued.
        Returns their ids so the caller can mark their history ``interrupted``."""
        with self.engine.begin() as conn:
            query = select(run_queue.c.id).where(run_queue.c.status == "running")
            if node is not None:
                query = query.where(run_queue.c.node == node)
            ids = [row.id for row in conn.execute(query)]
            if ids:
                conn.execute(
                    update(run_queue)
                    .where(run_queue.c.id.in_(ids))
                    .values(status="queued", node=None, claimed_at=None)
                )
        return ids

    def purge_expired_keys(self) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(dedupe_keys).where(dedupe_keys.c.expires_at < datetime.now(UTC))
            )
            return int(result.rowcount or 0)
