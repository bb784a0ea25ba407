"""Fake SuperOffice: form-encoded OAuth, and every API call needs the matching SO-Ticket."""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from flowrunner.sandbox.httputil import (
    ApiError,
    bearer_token,
    form_fields,
    invalid_token,
    secret_equals,
)
from flowrunner.sandbox.state import (
    SUPEROFFICE_CLIENT_ID,
    SUPEROFFICE_CLIENT_SECRET,
    SUPEROFFICE_REFRESH_TOKEN,
    SandboxState,
    TicketGrant,
)

ACCESS_TOKEN_TTL = 3600
CONTACTS = (
    {"ContactId": 1, "Name": "Fjord Logistics AS", "OrgNr": "912345678"},
    {"ContactId": 2, "Name": "Nordlys Energi AS", "OrgNr": "923456789"},
    {"ContactId": 3, "Name": "Polar Tech AS", "OrgNr": "934567890"},
)


def build_routes(state: SandboxState) -> list[BaseRoute]:
    api = _SuperOfficeApi(state)
    return [
        Route("/superoffice/login/common/oauth/tokens", api.token, methods=["POST"]),
        Route("/superoffice/api/v1/Contact", api.list_contacts, methods=["GET"]),
    ]


class _SuperOfficeApi:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def token(self, request: Request) -> Response:
        fields = await form_fields(request)
        client_ok = secret_equals(fields.get("client_id"), SUPEROFFICE_CLIENT_ID)
        if not (
            client_ok and secret_equals(fields.get("client_secret"), SUPEROFFICE_CLIENT_SECRET)
        ):
            raise ApiError(401, "invalid_client", "unknown client_id or wrong client_secret")
        grant_type = fields.get("grant_type")
        if grant_type == "refresh_token":
            if not secret_equals(fields.get("refresh_token"), SUPEROFFICE_REFRESH_TOKEN):
                raise ApiError(400, "invalid_grant", "unknown refresh token")
        elif grant_type != "client_credentials":
            raise ApiError(
                400,
                "unsupported_grant_type",
                "grant_type must be refresh_token or client_credentials",
            )
        access = secrets.token_urlsafe(32)
        ticket = f"7T:{secrets.token_urlsafe(24)}"
        expires_at = self.state.clock() + ACCESS_TOKEN_TTL
        self.state.superoffice.sessions[access] = TicketGrant(ticket, expires_at)
        self.state.count_token("superoffice")
        # SuperOffice does not rotate refresh tokens, so none is returned.
        return JSONResponse(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": ACCESS_TOKEN_TTL,
                "so_ticket": ticket,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def list_contacts(self, request: Request) -> Response:
        grant = self.state.superoffice.sessions.get(bearer_token(request))
        if grant is None:
            raise invalid_token("unknown access token")
        if self.state.clock() >= grant.expires_at:
            raise invalid_token("access token expired")
        ticket = request.headers.get("so-ticket")
        if ticket is None:
            raise ApiError(401, "invalid_request", "the SO-Ticket header is required")
        if not secret_equals(ticket, grant.ticket):
            raise ApiError(401, "invalid_ticket", "the SO-Ticket does not match the access token")
        return JSONResponse({"value": list(CONTACTS)})
