"""Fake Ermeo: JSON OAuth (password and single-use refresh tokens), assets and work orders."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from flowrunner.sandbox.httputil import (
    ApiError,
    bearer_token,
    invalid_request,
    invalid_token,
    json_object,
    media_type,
    positive_int_param,
    required_text,
    secret_equals,
)
from flowrunner.sandbox.state import (
    ERMEO_CLIENT_ID,
    ERMEO_CLIENT_SECRET,
    ERMEO_PASSWORD,
    ERMEO_USER_TOKENS,
    ERMEO_USERNAME,
    WORK_ORDERS_READ,
    WORK_ORDERS_WRITE,
    Grant,
    SandboxState,
)

ASSETS_PER_SITE = 25
ASSET_PAGE_SIZE = 10
_ASSET_KINDS = ("Pump", "Compressor", "Conveyor", "Boiler", "Chiller")
# The service account acts for the integration as a whole, so it holds every role.
SERVICE_ACCOUNT_ROLES = (WORK_ORDERS_READ, WORK_ORDERS_WRITE)


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the service account or a connected user."""

    name: str
    roles: tuple[str, ...]


def build_routes(state: SandboxState) -> list[BaseRoute]:
    api = _ErmeoApi(state)
    return [
        Route("/ermeo/oauth/v2/token", api.token, methods=["POST"]),
        Route("/ermeo/api/v1/assets", api.list_assets, methods=["GET"]),
        Route("/ermeo/api/v1/work-orders", api.create_work_order, methods=["POST"]),
        Route("/ermeo/api/v1/work-orders/{work_order_id}", api.get_work_order, methods=["GET"]),
    ]


def site_assets(site: str) -> list[dict[str, str]]:
    return [
        {"id": f"A-{n:03d}", "name": f"{_ASSET_KINDS[n % len(_ASSET_KINDS)]} {n:03d}", "site": site}
        for n in range(1, ASSETS_PER_SITE + 1)
    ]


class _ErmeoApi:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def token(self, request: Request) -> Response:
        # Ermeo's token endpoint is unusual: it wants JSON, not the OAuth form encoding.
        if media_type(request) != "application/json":
            raise invalid_request("the token endpoint requires a JSON body, not a form")
        body = await json_object(request)
        client_ok = secret_equals(body.get("client_id"), ERMEO_CLIENT_ID)
        if not (client_ok and secret_equals(body.get("client_secret"), ERMEO_CLIENT_SECRET)):
            raise ApiError(401, "invalid_client", "unknown client_id or wrong client_secret")
        grant_type = body.get("grant_type")
        if grant_type == "password":
            subject = self._check_password(body)
        elif grant_type == "refresh_token":
            subject = self._redeem_refresh_token(body.get("refresh_token"))
        else:
            raise ApiError(
                400, "unsupported_grant_type", "grant_type must be password or refresh_token"
            )
        return JSONResponse(self._issue_tokens(subject), headers={"Cache-Control": "no-store"})

    def _check_password(self, body: dict[str, Any]) -> str:
        user_ok = secret_equals(body.get("username"), ERMEO_USERNAME)
        if not (user_ok and secret_equals(body.get("password"), ERMEO_PASSWORD)):
            raise ApiError(400, "invalid_grant", "wrong username or password")
        return ERMEO_USERNAME

    def _redeem_refresh_token(self, token: object) -> str:
        grant = self.state.ermeo.refresh_tokens.get(token) if isinstance(token, str) else None
        if grant is None:
            raise ApiError(400, "invalid_grant", "unknown refresh token")
        if grant.used:
            self.state.count_refresh_token_reuse()
            raise ApiError(400, "invalid_grant", "refresh token already used")
        if self.state.clock() >= grant.expires_at:
            raise ApiError(400, "invalid_grant", "refresh token expired")
        grant.used = True
        return grant.subject

    def _issue_tokens(self, subject: str) -> dict[str, str]:
        now = self.state.clock()
        settings = self.state.settings
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self.state.ermeo.access_tokens[access] = Grant(subject, now + settings.access_token_ttl)
        self.state.ermeo.refresh_tokens[refresh] = Grant(subject, now + settings.refresh_token_ttl)
        self.state.count_token("ermeo")
        return {
            "access_token": access,
            "expires_in": str(settings.access_token_ttl),  # Ermeo really sends a string
            "token_type": "bearer",
            "refresh_token": refresh,
            "scope": "api",
        }

    def _authenticate(self, request: Request) -> Principal:
        token = bearer_token(request)
        user = ERMEO_USER_TOKENS.get(token)
        if user is not None:
            return Principal(user.email, user.roles)
        grant = self.state.ermeo.access_tokens.get(token)
        if grant is None:
            raise invalid_token("unknown access token")
        if self.state.clock() >= grant.expires_at:
            raise invalid_token("access token expired")
        return Principal(grant.subject, SERVICE_ACCOUNT_ROLES)

    def _authorise(self, request: Request, role: str) -> Principal:
        principal = self._authenticate(request)
        if role not in principal.roles:
            raise ApiError(403, "forbidden", f"missing role {role}", description_key="message")
        return principal

    async def list_assets(self, request: Request) -> Response:
        self._authenticate(request)
        site = request.query_params.get("site")
        if not site:
            raise invalid_request("the site query parameter is required")
        page = positive_int_param(request, "page", default=1)
        start = (page - 1) * ASSET_PAGE_SIZE
        data = site_assets(site)[start : start + ASSET_PAGE_SIZE]
        has_more = start + ASSET_PAGE_SIZE < ASSETS_PER_SITE
        # Absolute, built from the request, so it is right whatever host/port the sandbox has.
        next_url = str(request.url.include_query_params(page=page + 1)) if has_more else None
        return JSONResponse({"data": data, "next": next_url})

    async def create_work_order(self, request: Request) -> Response:
        principal = self._authorise(request, WORK_ORDERS_WRITE)
        body = await json_object(request)
        work_orders = self.state.ermeo.work_orders
        work_order = {
            "id": f"WO-{len(work_orders) + 1}",
            "asset_id": required_text(body, "asset_id"),
            "title": required_text(body, "title"),
            "created_by": principal.name,
        }
        work_orders[work_order["id"]] = work_order
        return JSONResponse(work_order, status_code=201)

    async def get_work_order(self, request: Request) -> Response:
        self._authorise(request, WORK_ORDERS_READ)
        work_order_id = request.path_params["work_order_id"]
        work_order = self.state.ermeo.work_orders.get(work_order_id)
        if work_order is None:
            raise ApiError(404, "not_found", f"no work order {work_order_id}")
        return JSONResponse(work_order)
