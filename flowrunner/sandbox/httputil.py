"""Request parsing and JSON error helpers shared by the fake systems."""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse


class ApiError(Exception):
    """Raised by a handler; the app turns it into a JSON error response."""

    def __init__(
        self,
        status: int,
        error: str,
        description: str | None = None,
        *,
        description_key: str = "error_description",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.body = {"error": error}
        if description is not None:
            self.body[description_key] = description
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def invalid_request(description: str) -> ApiError:
    return ApiError(400, "invalid_request", description)


def invalid_token(description: str, error: str = "invalid_token") -> ApiError:
    return ApiError(401, error, description, headers={"WWW-Authenticate": "Bearer"})


def secret_equals(candidate: object, expected: str) -> bool:
    """Compare in constant time; anything that is not a string never matches."""
    if not isinstance(candidate, str):
        return False
    return hmac.compare_digest(candidate.encode(), expected.encode())


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def bearer_token(request: Request) -> str:
    """Return the bearer token, or raise 401 when the header is missing or not Bearer."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise invalid_token("an Authorization: Bearer <token> header is required")
    return token.strip()


def basic_credentials(request: Request) -> tuple[str, str] | None:
    """Decode `Authorization: Basic base64(user:password)`, or None when absent or malformed."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


async def json_object(request: Request) -> dict[str, Any]:
    """Parse the body as a JSON object, or raise 400 invalid_request."""
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise invalid_request("the body must be JSON (Content-Type: application/json)") from exc
    if not isinstance(body, dict):
        raise invalid_request("the JSON body must be an object")
    return body


async def form_fields(request: Request) -> dict[str, str]:
    """Parse an application/x-www-form-urlencoded body, or raise 400 invalid_request."""
    # Parsed by hand: Starlette's request.form() needs python-multipart, which we do not ship.
    if media_type(request) != "application/x-www-form-urlencoded":
        raise invalid_request("the body must be form-encoded (application/x-www-form-urlencoded)")
    try:
        text = (await request.body()).decode("utf-8")
        return dict(parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text)))
    except ValueError as exc:
        raise invalid_request("the form body is malformed") from exc


def required_text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise invalid_request(f"{name} is required and must be a non-empty string")
    return value


def positive_int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise invalid_request(f"{name} must be a positive integer")
    return int(raw)
