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


# The history keeps this much of a name; a claim longer than that is not a user name.
MAX_USER_LENGTH = 200


def user_of_credential(value: str | None) -> str | None:
    """The user an Authorization value (``Bearer <jwt>``) or a bare token belongs to, as
    its claims name them; None for an opaque token, or none. The claims are not verified
    (the API checks the token): this names the user for people to read, it proves
    nothing."""
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    return user_of(rest.strip() if rest else scheme)


def user_of(token: str) -> str | None:
    """The user a token belongs to, from the claims identity providers commonly use: the
    first that is a name one can print (not empty, no control characters, at most
    ``MAX_USER_LENGTH`` characters)."""
    values = claims(token)
    if not values:
        return None
    for name in ("email", "preferred_username", "upn", "unique_name", "username", "sub"):
        value = values.get(name)
        if isinstance(value, str) and _printable_name(value):
            return value
    return None


def _printable_name(value: str) -> bool:
    # A name printed in a terminal or a log must not carry escape codes or line breaks.
    return 0 < len(value) <= MAX_USER_LENGTH and value.isprintable() and value.strip() == value
