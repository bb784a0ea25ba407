"""Fake iObeya: admin-issued machine-user JWTs with revocation, boards and cards."""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from flowrunner.sandbox import jwt
from flowrunner.sandbox.httputil import (
    ApiError,
    bearer_token,
    invalid_request,
    invalid_token,
    json_object,
    required_text,
    secret_equals,
)
from flowrunner.sandbox.state import IOBEYA_ADMIN_KEY, SandboxState

MIN_VALIDITY_SECONDS = 60
MAX_VALIDITY_SECONDS = 365 * 86400
# validity_seconds exists so tests can mint very short-lived tokens; it may go down to 1 s.
MIN_TEST_VALIDITY_SECONDS = 1

BOARDS = (
    {"id": "board-ops", "name": "Operations Obeya"},
    {"id": "board-maintenance", "name": "Maintenance Board"},
)


def build_routes(state: SandboxState) -> list[BaseRoute]:
    api = _IobeyaApi(state)
    return [
        Route("/iobeya/admin/machine-users/{user}/tokens", api.issue_token, methods=["POST"]),
        Route("/iobeya/admin/tokens/revoke", api.revoke_token, methods=["POST"]),
        Route("/iobeya/s/api/boards", api.list_boards, methods=["GET"]),
        Route("/iobeya/s/api/cards", api.create_card, methods=["POST"]),
        Route("/iobeya/s/api/cards", api.list_cards, methods=["GET"]),
    ]


def validity_seconds(body: dict[str, Any]) -> int:
    """Read the requested lifetime, from validity_seconds or validity_days, within limits."""
    if "validity_seconds" in body:
        value, unit, minimum = body["validity_seconds"], 1, MIN_TEST_VALIDITY_SECONDS
    elif "validity_days" in body:
        value, unit, minimum = body["validity_days"], 86400, MIN_VALIDITY_SECONDS
    else:
        raise invalid_request("validity_days is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid_request("the validity must be a number")
    seconds = int(value * unit)
    if not minimum <= seconds <= MAX_VALIDITY_SECONDS:
        raise invalid_request("the validity must be between 1 minute and 365 days")
    return seconds


class _IobeyaApi:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def _require_admin(self, request: Request) -> None:
        if not secret_equals(request.headers.get("x-admin-key"), IOBEYA_ADMIN_KEY):
            raise ApiError(401, "unauthorized", "a valid X-Admin-Key header is required")

    async def issue_token(self, request: Request) -> Response:
        self._require_admin(request)
        seconds = validity_seconds(await json_object(request))
        issued = self.state.mint_iobeya_token(request.path_params["user"], seconds)
        self.state.count_token("iobeya")
        return JSONResponse(
            {"token": issued.token, "expires_at": issued.expires_at_iso}, status_code=201
        )

    async def revoke_token(self, request: Request) -> Response:
        self._require_admin(request)
        body = await json_object(request)
        token, jti = body.get("token"), body.get("jti")
        if isinstance(token, str):
            try:
                # Expired tokens can still be revoked, so only the signature matters here.
                jti = jwt.decode(token, self.state.iobeya_signing_key, now=None).get("jti")
            except jwt.InvalidTokenError as exc:
                raise invalid_request("token is not a token issued by this iObeya") from exc
        elif not isinstance(jti, str):
            raise invalid_request("give either token or jti")
        if not isinstance(jti, str) or jti not in self.state.iobeya.issued_jtis:
            raise ApiError(404, "not_found", "no such token")
        self.state.iobeya.revoked_jtis.add(jti)
        return JSONResponse({"revoked": jti})

    def _authenticate(self, request: Request) -> str:
        """Return the machine user the bearer JWT was issued to."""
        token = bearer_token(request)
        try:
            claims = jwt.decode(token, self.state.iobeya_signing_key, now=None)
            # Revocation is checked first: an explicit revoke is the more useful diagnosis.
            if claims.get("jti") in self.state.iobeya.revoked_jtis:
                raise invalid_token("token has been revoked", error="token_revoked")
            jwt.check_expiry(claims, self.state.clock())
        except jwt.ExpiredTokenError as exc:
            raise invalid_token("token has expired", error="token_expired") from exc
        except jwt.InvalidTokenError as exc:
            raise invalid_token("token is not valid") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str):
            raise invalid_token("token has no subject")
        return subject

    async def list_boards(self, request: Request) -> Response:
        self._authenticate(request)
        return JSONResponse(list(BOARDS))

    async def create_card(self, request: Request) -> Response:
        user = self._authenticate(request)
        body = await json_object(request)
        required_text(body, "title")
        board_id = body.get("board_id", BOARDS[0]["id"])
        if board_id not in [board["id"] for board in BOARDS]:
            raise invalid_request(f"unknown board_id {board_id!r}")
        cards = self.state.iobeya.cards
        card = {**body, "id": f"card-{len(cards) + 1}", "board_id": board_id, "created_by": user}
        cards.append(card)
        return JSONResponse(card, status_code=201)

    async def list_cards(self, request: Request) -> Response:
        self._authenticate(request)
        return JSONResponse(self.state.iobeya.cards)
