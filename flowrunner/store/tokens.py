"""Stored credentials: encrypted at rest, with a lease so one process refreshes at a time."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from flowrunner.store.crypto import TokenCipher
from flowrunner.store.database import Database
from flowrunner.store.schema import credentials


class ProfileStatus(enum.StrEnum):
    OK = "ok"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    REJECTED = "rejected"  # refused with 401 before its expiry: revoked
    NEEDS_LOGIN = "needs_login"  # no way left to obtain a token without a human
    FORBIDDEN = "forbidden"  # the last call was refused with 403


def fingerprint(token: str) -> str:
    """Identifies a credential in reminders and logs without revealing it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass
class Credential:
    profile: str
    access_token: str | None = None
    access_expires_at: datetime | None = None
    refresh_token: str | None = None
    refresh_expires_at: datetime | None = None
    refresh_token_spent: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    issued_at: datetime | None = None
    status: str = ProfileStatus.OK
    last_error: str | None = None
    last_used_at: datetime | None = None
    last_refreshed_at: datetime | None = None

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.access_token) if self.access_token else None


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class TokenStore:
    def __init__(self, database: Database, cipher: TokenCipher) -> None:
        self.engine = database.engine
        self.cipher = cipher

    def load(self, profile: str) -> Credential | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(credentials).where(credentials.c.profile == profile)).first()
        if row is None:
            return None
        m = row._mapping
        extra = self.cipher.decrypt(m["extra"])
        return Credential(
            profile=profile,
            access_token=self.cipher.decrypt(m["access_token"]),
            access_expires_at=_utc(m["access_expires_at"]),
            refresh_token=self.cipher.decrypt(m["refresh_token"]),
            refresh_expires_at=_utc(m["refresh_expires_at"]),
            refresh_token_spent=bool(m["refresh_token_spent"]),
            extra=json.loads(extra) if extra else {},
            issued_at=_utc(m["issued_at"]),
            status=m["status"],
            last_error=m["last_error"],
            last_used_at=_utc(m["last_used_at"]),
            last_refreshed_at=_utc(m["last_refreshed_at"]),
        )

    def all(self) -> dict[str, Credential]:
        with self.engine.connect() as conn:
            names = [r[0] for r in conn.execute(select(credentials.c.profile))]
        found = {name: self.load(name) for name in names}
        return {name: cred for name, cred in found.items() if cred is not None}

    def _ensure_row(self, profile: str) -> None:
        with self.engine.begin() as conn:
            exists = conn.execute(
                select(credentials.c.profile).where(credentials.c.profile == profile)
            ).first()
            if exists is None:
                try:
                    conn.execute(insert(credentials).values(profile=profile, status="ok"))
                except IntegrityError:
                    pass  # another process created it first

    def save(self, credential: Credential, *, release_lease_of: str | None = None) -> None:
        """Write the credential durably (the commit returns only once it is on disk)."""
        self._ensure_row(credential.profile)
        values: dict[str, Any] = {
            "access_token": self.cipher.encrypt(credential.access_token),
            "access_expires_at": credential.access_expires_at,
            "refresh_token": self.cipher.encrypt(credential.refresh_token),
            "refresh_expires_at": credential.refresh_expires_at,
            "refresh_token_spent": int(credential.refresh_token_spent),
            "extra": self.cipher.encrypt(json.dumps(credential.extra))
            if credential.extra
            else None,
            "issued_at": credential.issued_at,
            "fingerprint": credential.fingerprint,
            "status": credential.status,
            "last_error": credential.last_error,
            "last_used_at": credential.last_used_at,
            "last_refreshed_at": credential.last_refreshed_at,
            "updated_at": datetime.now(UTC),
        }
        if release_lease_of is not None:
            values.update(lease_holder=None, lease_until=None)
        with self.engine.begin() as conn:
            conn.execute(
                update(credentials)
                .where(credentials.c.profile == credential.profile)
                .values(**values)
            )

    def set_status(self, profile: str, status: str, error: str | None = None) -> None:
        self._ensure_row(profile)
        with self.engine.begin() as conn:
            conn.execute(
                update(credentials)
                .where(credentials.c.profile == profile)
                .values(status=status, last_error=error, updated_at=datetime.now(UTC))
            )

    def touch(self, profile: str, when: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(credentials)
                .where(credentials.c.profile == profile)
                .values(last_used_at=when)
            )

    # ------------------------------------------------------------ the refresh lease

    def try_lease(self, profile: str, holder: str, now: datetime, length: timedelta) -> bool:
        """Take the profile's refresh lease unless another live holder has it."""
        self._ensure_row(profile)
        with self.engine.begin() as conn:
            result = conn.execute(
                update(credentials)
                .where(credentials.c.profile == profile)
                .where(
                    (credentials.c.lease_holder.is_(None))
                    | (credentials.c.lease_holder == holder)
                    | (credentials.c.lease_until < now)
                )
                .values(lease_holder=holder, lease_until=now + length)
            )
            return bool(result.rowcount)

    def lease_holder(self, profile: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(credentials.c.lease_holder).where(credentials.c.profile == profile)
            ).first()
        return row[0] if row is not None else None

    def release_lease(self, profile: str, holder: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(credentials)
                .where(credentials.c.profile == profile)
                .where(credentials.c.lease_holder == holder)
                .values(lease_holder=None, lease_until=None)
            )
