"""Minimal HS256 JSON Web Tokens: just enough for the sandbox's fake identity providers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

_HEADER = {"alg": "HS256", "typ": "JWT"}


class InvalidTokenError(Exception):
    """The token is malformed or its signature does not verify."""


class ExpiredTokenError(InvalidTokenError):
    """The token is authentic but its `exp` claim has passed."""


def encode(claims: Mapping[str, Any], key: bytes) -> str:
    """Serialise `claims` as a compact HS256 JWT signed with `key`."""
    signing_input = f"{_encode_segment(_HEADER)}.{_encode_segment(claims)}"
    return f"{signing_input}.{_sign(signing_input, key)}"


def decode(token: str, key: bytes, *, now: float | None) -> dict[str, Any]:
    """Verify the signature (and `exp` against `now` unless it is None) and return the claims."""
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidTokenError("a JWT has three dot-separated segments")
    header_segment, payload_segment, signature = parts
    expected = _sign(f"{header_segment}.{payload_segment}", key)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise InvalidTokenError("signature does not verify")
    # Checked after the signature so an attacker cannot pick the algorithm ("alg": "none").
    if _decode_segment(header_segment).get("alg") != "HS256":
        raise InvalidTokenError("only HS256 tokens are accepted")
    claims = _decode_segment(payload_segment)
    if now is not None:
        check_expiry(claims, now)
    return claims


def check_expiry(claims: Mapping[str, Any], now: float) -> None:
    """Raise ExpiredTokenError when `now` is at or past the `exp` claim."""
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise InvalidTokenError("token has no numeric exp claim")
    if now >= exp:
        raise ExpiredTokenError("token expired")


def _sign(signing_input: str, key: bytes) -> str:
    return _b64encode(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def _encode_segment(value: Mapping[str, Any]) -> str:
    return _b64encode(json.dumps(dict(value), separators=(",", ":")).encode())


def _decode_segment(segment: str) -> dict[str, Any]:
    try:
        padded = segment + "=" * (-len(segment) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except ValueError as exc:  # binascii, unicode and JSON errors are all ValueErrors
        raise InvalidTokenError("malformed token segment") from exc
    if not isinstance(value, dict):
        raise InvalidTokenError("token segment is not a JSON object")
    return value


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
