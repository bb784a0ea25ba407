"""Fake Tripletex: consumer+employee tokens make a session token, used as Basic "0:<token>"."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from flowrunner.sandbox.httputil import (
    ApiError,
    basic_credentials,
    invalid_request,
    secret_equals,
)
from flowrunner.sandbox.state import (
    TRIPLETEX_CONSUMER_TOKEN,
    TRIPLETEX_EMPLOYEE_TOKEN,
    SandboxState,
)

INVOICE_COUNT = 20
INVOICE_SPACING_DAYS = 3
_CUSTOMERS = ("Fjord Logistics AS", "Nordlys Energi AS", "Bergen Bakeri AS", "Polar Tech AS")


def build_routes(state: SandboxState) -> list[BaseRoute]:
    api = _TripletexApi(state)
    return [
        # The literal ":create" is part of Tripletex's real path; Starlette escapes it as text.
        Route("/tripletex/v2/token/session/:create", api.create_session, methods=["PUT"]),
        Route("/tripletex/v2/invoice", api.list_invoices, methods=["GET"]),
    ]


def _date_param(request: Request, name: str) -> dt.date:
    raw = request.query_params.get(name)
    if raw is None:
        raise invalid_request(f"{name} is required (YYYY-MM-DD)")
    try:
        return dt.date.fromisoformat(raw)
    except ValueError as exc:
        raise invalid_request(f"{name} must be a date formatted YYYY-MM-DD") from exc


def invoices(today: dt.date) -> list[dict[str, Any]]:
    """Invoices dated back from today, so "last N days" queries always find some."""
    return [
        {
            "id": 1000 + n,
            "invoiceNumber": n,
            "invoiceDate": (today - dt.timedelta(days=(n - 1) * INVOICE_SPACING_DAYS)).isoformat(),
            "amount": round(1000 + n * 137.5, 2),
            "customer": {"name": _CUSTOMERS[n % len(_CUSTOMERS)]},
        }
        for n in range(1, INVOICE_COUNT + 1)
    ]


class _TripletexApi:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def _today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.state.clock(), dt.UTC).date()

    async def create_session(self, request: Request) -> Response:
        query = request.query_params
        consumer_ok = secret_equals(query.get("consumerToken"), TRIPLETEX_CONSUMER_TOKEN)
        if not (
            consumer_ok and secret_equals(query.get("employeeToken"), TRIPLETEX_EMPLOYEE_TOKEN)
        ):
            raise ApiError(401, "unauthorized", "wrong consumerToken or employeeToken")
        expiration = _date_param(request, "expirationDate")
        now = self.state.clock()
        # The session ends when expirationDate begins (UTC), and never outlives session_ttl,
        # which keeps expiry quick to exercise in tests.
        ends = dt.datetime.combine(expiration, dt.time.min, dt.UTC).timestamp()
        if ends <= now:
            raise invalid_request("expirationDate must be in the future")
        token = secrets.token_urlsafe(24)
        self.state.tripletex.sessions[token] = min(ends, now + self.state.settings.session_ttl)
        self.state.count_token("tripletex")
        return JSONResponse({"value": {"token": token, "expirationDate": expiration.isoformat()}})

    def _authenticate(self, request: Request) -> None:
        credentials = basic_credentials(request)
        if credentials is None:
            raise ApiError(401, "unauthorized", 'Basic auth "0:<session token>" is required')
        company, token = credentials
        expires_at = self.state.tripletex.sessions.get(token)
        if not company.isdigit() or expires_at is None:
            raise ApiError(401, "unauthorized", "unknown session token")
        if self.state.clock() >= expires_at:
            raise ApiError(401, "unauthorized", "session token expired")

    async def list_invoices(self, request: Request) -> Response:
        self._authenticate(request)
        date_from = _date_param(request, "invoiceDateFrom")
        date_to = _date_param(request, "invoiceDateTo")
        # Like Tripletex, the "to" date is exclusive.
        values = [
            invoice
            for invoice in invoices(self._today())
            if date_from <= dt.date.fromisoformat(invoice["invoiceDate"]) < date_to
        ]
        return JSONResponse({"fullResultSize": len(values), "values": values})
