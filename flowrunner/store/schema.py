"""Tables, and the migrations that create them, in order.

Each migration is a list of tables to create or a function to run; the version reached is kept
in ``schema_version`` so that an older database is brought forward on open.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    text,
)

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("flow", String(100), nullable=False),
    Column("status", String(20), nullable=False),
    Column("trigger", JSON, nullable=False),
    Column("inputs", JSON, nullable=False),
    Column("outputs", JSON),
    Column("response", JSON),
    Column("error", Text),
    Column("user", String(200)),
    Column("parent_id", String(36)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    # Every step of the run, in order (schema 5 on): a run is one row, written once.
    # Runs written before keep their steps in run_steps.
    Column("steps", JSON),
    Index("ix_runs_flow_started", "flow", "started_at"),
    Index("ix_runs_started", "started_at"),
)

# The steps of runs written before schema 5; read, never written.
run_steps = Table(
    "run_steps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("path", String(500), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("status", String(20), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("request", JSON),
    Column("response", JSON),
    Column("outputs", JSON),
    Column("message", Text),
    Column("error", Text),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Float, nullable=False),
    Index("ix_run_steps_run", "run_id", "seq"),
)

# One row per auth profile: its current credential (encrypted), its state, and the lease
# that makes a refresh single-flight across processes sharing this database.
credentials = Table(
    "credentials",
    metadata,
    Column("profile", String(100), primary_key=True),
    Column("access_token", Text),
    Column("access_expires_at", DateTime(timezone=True)),
    Column("refresh_token", Text),
    Column("refresh_expires_at", DateTime(timezone=True)),
    # A refresh request was sent with this refresh token and its answer was not stored:
    # the server may have consumed it, so it is never sent again.
    Column("refresh_token_spent", Integer, nullable=False, default=0),
    Column("extra", Text),
    Column("issued_at", DateTime(timezone=True)),
    Column("fingerprint", String(64)),
    Column("status", String(20), nullable=False, default="ok"),
    Column("last_error", Text),
    Column("last_used_at", DateTime(timezone=True)),
    Column("last_refreshed_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
    Column("lease_holder", String(64)),
    Column("lease_until", DateTime(timezone=True)),
)

# The durable intake: a webhook or a schedule fire is a row here, committed before it is
# acknowledged; workers claim rows, so a crash loses nothing.
run_queue = Table(
    "run_queue",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("flow", String(100), nullable=False),
    Column("trigger", JSON, nullable=False),
    Column("inputs", JSON, nullable=False),
    Column("user_token", Text),  # encrypted
    Column("status", String(20), nullable=False),  # queued | running | done
    Column("node", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("claimed_at", DateTime(timezone=True)),
    Index("ix_run_queue_status", "status", "created_at"),
)

# A key seen once in a window: webhook dedupe keys, and one row per schedule fire, which
# is what keeps a fire from running twice after a restart or on several nodes.
dedupe_keys = Table(
    "dedupe_keys",
    metadata,
    Column("scope", String(200), primary_key=True),
    Column("key", String(500), primary_key=True),
    Column("run_id", String(36), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# One row per reminder threshold reached for one credential (by fingerprint, never the
# token): what makes a reminder go out once, across restarts.
reminders_sent = Table(
    "reminders_sent",
    metadata,
    Column("profile", String(100), primary_key=True),
    Column("fingerprint", String(64), primary_key=True),
    Column("threshold_seconds", Integer, primary_key=True),
    Column("sent_at", DateTime(timezone=True), nullable=False),
)

# Every notification, per channel, until delivered: retried with backoff, never dropped
# silently; failures stay visible.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("channel", String(100), nullable=False),
    Column("topic", String(200), nullable=False),  # e.g. "profile:iobeya" or "flow:sync"
    Column("subject", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("recipients", JSON, nullable=False),
    Column("status", String(20), nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Index("ix_outbox_status", "status", "next_attempt_at"),
)

# The last status each profile was alerted for, and when each flow last alerted a failure.
alert_state = Table(
    "alert_state",
    metadata,
    Column("topic", String(200), primary_key=True),
    Column("value", String(200), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
)


def _add_run_steps_column(conn: Connection) -> None:
    """Schema 5: a run's steps in a column of its row. A database created at 5 or later
    already has it (create_all makes tables as they are now)."""
    if "steps" not in {column["name"] for column in inspect(conn).get_columns("runs")}:
        conn.execute(text("ALTER TABLE runs ADD COLUMN steps JSON"))


Migration = list[Table] | Callable[[Connection], None]

# Version -> what that migration does: tables to create, or a function to run. Append;
# never edit a released entry.
MIGRATIONS: list[Migration] = [
    [runs, run_steps],
    [credentials],
    [run_queue, dedupe_keys],
    [reminders_sent, outbox, alert_state],
    _add_run_steps_column,
]
LATEST_VERSION = len(MIGRATIONS)
