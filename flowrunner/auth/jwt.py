"""Reading a JWT's claims without verifying it: we only want to know when it expires
(``exp``), when it was issued (``iat``) and whose it is. Verification is the API's job."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any


def claims(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        decoded = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, UnicodeError):
        return None
    return decoded if isinstance(decoded, dict) else None


def claim_time(values: dict[str, Any] | None, name: str) -> datetime | None:
    if not values:
        return None
    value = values.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC)
    return None


def user_of(token: str) -> str | None:
    """The user a token belongs to, from the claims identity providers commonly use."""
    values = claims(token)
    if not values:
        return None
    for name in ("email", "preferred_username", "upn", "unique_name", "username", "sub"):
        if isinstance(values.get(name), str):
            return str(values[name])
    return None
