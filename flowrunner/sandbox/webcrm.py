"""Fake webCRM: an application token buys a JWT plus a rotating, single-use refresh token."""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from flowrunner.sandbox import jwt
from flowrunner.sandbox.httputil import (
    ApiError,
    bearer_token,
    invalid_token,
    json_object,
    secret_equals,
)
from flowrunner.sandbox.state import WEBCRM_APP_TOKEN, Grant, SandboxState

ACCESS_TOKEN_TTL = 3600
API_SUBJECT = "webcrm-api"
ORGANISATIONS = (
    {"OrganisationId": 101, "OrganisationName": "Fjord Logistics AS", "OrganisationCity": "Bergen"},
    {"OrganisationId": 102, "OrganisationName": "Nordlys Energi AS", "OrganisationCity": "Tromsø"},
    {"OrganisationId": 103, "OrganisationName": "Polar Tech AS", "OrganisationCity": "Oslo"},
)


def build_routes(state: SandboxState) -> list[BaseRoute]:
    api = _WebcrmApi(state)
    return [
        Route("/webcrm/Auth/ApiLogin", api.login, methods=["POST"]),
        Route("/webcrm/Auth/ApiRefresh", api.refresh, methods=["POST"]),
        Route("/webcrm/Organisations", api.list_organisations, methods=["GET"]),
    ]


class _WebcrmApi:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def login(self, request: Request) -> Response:
        if not secret_equals(request.query_params.get("authCode"), WEBCRM_APP_TOKEN):
            raise ApiError(401, "invalid_auth_code", "unknown application token (authCode)")
        return self._issue_tokens()

    async def refresh(self, request: Request) -> Response:
        token = (await json_object(request)).get("refreshToken")
        grant = self.state.webcrm.refresh_tokens.get(token) if isinstance(token, str) else None
        if grant is None:
            raise ApiError(400, "invalid_grant", "unknown refresh token")
        if grant.used:
            self.state.count_refresh_token_reuse()
            raise ApiError(400, "invalid_grant", "refresh token already used")
        if self.state.clock() >= grant.expires_at:
            raise ApiError(400, "invalid_grant", "refresh token expired")
        grant.used = True
        return self._issue_tokens()

    def _issue_tokens(self) -> Response:
        now = int(self.state.clock())
        claims = {
            "sub": API_SUBJECT,
            "iat": now,
            "exp": now + ACCESS_TOKEN_TTL,
            "jti": secrets.token_hex(16),
        }
        refresh = secrets.token_urlsafe(32)
        refresh_expires_at = now + self.state.settings.refresh_token_ttl
        self.state.webcrm.refresh_tokens[refresh] = Grant(API_SUBJECT, refresh_expires_at)
        self.state.count_token("webcrm")
        return JSONResponse(
            {
                "AccessToken": jwt.encode(claims, self.state.webcrm_signing_key),
                "RefreshToken": refresh,
                "ExpiresIn": ACCESS_TOKEN_TTL,
                "TokenType": "Bearer",
            },
            headers={"Cache-Control": "no-store"},
        )

    async def list_organisations(self, request: Request) -> Response:
        token = bearer_token(request)
        try:
            jwt.decode(token, self.state.webcrm_signing_key, now=self.state.clock())
        except jwt.ExpiredTokenError as exc:
            raise invalid_token("access token expired", error="token_expired") from exc
        except jwt.InvalidTokenError as exc:
            raise invalid_token("access token is not valid") from exc
        return JSONResponse(list(ORGANISATIONS))
