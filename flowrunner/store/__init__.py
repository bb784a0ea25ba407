"""The state store: one database behind SQLAlchemy Core (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from flowrunner.store.database import Database, default_database_url
from flowrunner.store.runs import RunHistory, RunRecord, StepRecord

__all__ = ["Database", "RunHistory", "RunRecord", "StepRecord", "default_database_url"]
