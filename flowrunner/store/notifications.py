"""Reminders sent, the notification outbox, and alert state."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from flowrunner.store.database import Database, delete_in_batches
from flowrunner.store.schema import alert_state, outbox, reminders_sent

# Delivery retries: 1 min, 5 min, 15 min, 1 h, then every 4 h until it goes through.
BACKOFF = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=4),
)


@dataclass
class OutboxItem:
    id: int
    channel: str
    topic: str
    subject: str
    body: str
    recipients: list[str]
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class NotificationStore:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.engine = database.engine

    # ------------------------------------------------------------ reminders

    def reminders_sent(self, profile: str, fingerprint: str) -> set[int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(reminders_sent.c.threshold_seconds)
                .where(reminders_sent.c.profile == profile)
                .where(reminders_sent.c.fingerprint == fingerprint)
            )
            return {int(r[0]) for r in rows}

    def mark_reminders(
        self, profile: str, fingerprint: str, thresholds: list[int], when: datetime
    ) -> bool:
        """Record thresholds as reminded; False if another process recorded them first."""
        try:
            with self.engine.begin() as conn:
                for threshold in thresholds:
                    conn.execute(
                        insert(reminders_sent).values(
                            profile=profile,
                            fingerprint=fingerprint,
                            threshold_seconds=threshold,
                            sent_at=when,
                        )
                    )
        except IntegrityError:
            return False
        return True

    # ------------------------------------------------------------ outbox

    def enqueue(
        self,
        channel: str,
        topic: str,
        subject: str,
        body: str,
        recipients: list[str],
        now: datetime,
    ) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(outbox).values(
                    channel=channel,
                    topic=topic,
                    subject=subject,
                    body=body,
                    recipients=recipients,
                    status="pending",
                    attempts=0,
                    created_at=now,
                    next_attempt_at=now,
                )
            )
            key = result.inserted_primary_key
            return int(key[0]) if key else 0

    def due(self, now: datetime, limit: int = 100) -> list[OutboxItem]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(outbox)
                .where(outbox.c.status.in_(("pending", "failed")))
                .where(outbox.c.next_attempt_at <= now)
                .order_by(outbox.c.id)
                .limit(limit)
            ).fetchall()
        return [_item(row._mapping) for row in rows]

    def delivered(self, item_id: int, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id == item_id)
                .values(status="sent", sent_at=now, last_error=None, attempts=outbox.c.attempts + 1)
            )

    def failed(self, item: OutboxItem, error: str, now: datetime) -> None:
        delay = BACKOFF[min(item.attempts, len(BACKOFF) - 1)]
        with self.engine.begin() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id == item.id)
                .values(
                    status="failed",
                    last_error=error[:500],
                    attempts=item.attempts + 1,
                    next_attempt_at=now + delay,
                )
            )

    def failures(self) -> list[OutboxItem]:
        """Notifications not delivered yet after at least one attempt."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(outbox).where(outbox.c.status == "failed").order_by(outbox.c.id)
            ).fetchall()
        return [_item(row._mapping) for row in rows]

    def all(self) -> list[OutboxItem]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(outbox).order_by(outbox.c.id)).fetchall()
        return [_item(row._mapping) for row in rows]

    def prune_sent(self, before: datetime, stop: threading.Event | None = None) -> int:
        """Remove notifications delivered before ``before``; pending and failed ones stay.
        In short transactions, as the history's prune."""

        def delete_batch(conn: Connection, size: int) -> int:
            oldest = (
                select(outbox.c.id)
                .where(outbox.c.status == "sent")
                .where(outbox.c.sent_at < before.astimezone(UTC))
                .order_by(outbox.c.id)
                .limit(size)
                .scalar_subquery()
            )
            return int(conn.execute(delete(outbox).where(outbox.c.id.in_(oldest))).rowcount or 0)

        return delete_in_batches(self.database, delete_batch, stop)

    # ------------------------------------------------------------ alert state

    def alert_value(self, topic: str) -> tuple[str, datetime] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(alert_state.c.value, alert_state.c.at).where(alert_state.c.topic == topic)
            ).first()
        if row is None:
            return None
        at = _utc(row.at)
        assert at is not None  # noqa: S101 - the column is NOT NULL
        return str(row.value), at

    def set_alert_value(self, topic: str, value: str, when: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(alert_state).where(alert_state.c.topic == topic))
            conn.execute(insert(alert_state).values(topic=topic, value=value, at=when))


def _item(row: Any) -> OutboxItem:
    return OutboxItem(
        id=row["id"],
        channel=row["channel"],
        topic=row["topic"],
        subject=row["subject"],
        body=row["body"],
        recipients=list(row["recipients"] or []),
        status=row["status"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        created_at=_utc(row["created_at"]) or datetime.now(UTC),
        next_attempt_at=_utc(row["next_attempt_at"]) or datetime.now(UTC),
    )
