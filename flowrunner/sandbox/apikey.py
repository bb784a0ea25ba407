"""Fakes for static API keys: WooCommerce (key+secret in the query) and PowerOffice Go (header)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from flowrunner.sandbox.httputil import ApiError, basic_credentials, secret_equals
from flowrunner.sandbox.state import (
    POWEROFFICE_API_KEY,
    WOOCOMMERCE_CONSUMER_KEY,
    WOOCOMMERCE_CONSUMER_SECRET,
    SandboxState,
)

ORDERS = (
    {"id": 5001, "status": "processing", "total": "149.00", "currency": "NOK"},
    {"id": 5002, "status": "completed", "total": "899.50", "currency": "NOK"},
    {"id": 5003, "status": "on-hold", "total": "42.00", "currency": "NOK"},
)
CUSTOMERS = (
    {"Id": 1, "Name": "Fjord Logistics AS", "OrganizationNumber": "912345678"},
    {"Id": 2, "Name": "Bergen Bakeri AS", "OrganizationNumber": "945678901"},
)


def build_routes(state: SandboxState) -> list[BaseRoute]:
    # No state is needed: keys are fixed demo values. The parameter keeps the modules uniform.
    del state
    return [
        Route("/woocommerce/wp-json/wc/v3/orders", list_orders, methods=["GET"]),
        Route("/poweroffice/v2/customers", list_customers, methods=["GET"]),
    ]


def _woocommerce_credentials(request: Request) -> tuple[str | None, str | None]:
    # WooCommerce accepts the pair in the query string or, over HTTPS, as Basic auth.
    basic = basic_credentials(request)
    if basic is not None:
        return basic
    return request.query_params.get("consumer_key"), request.query_params.get("consumer_secret")


async def list_orders(request: Request) -> Response:
    key, secret = _woocommerce_credentials(request)
    key_ok = secret_equals(key, WOOCOMMERCE_CONSUMER_KEY)
    if not (key_ok and secret_equals(secret, WOOCOMMERCE_CONSUMER_SECRET)):
        raise ApiError(401, "invalid_api_key", "wrong or missing consumer_key/consumer_secret")
    # WooCommerce's filters: status (default any) and include (order ids), comma-separated.
    statuses = _listed(request.query_params.get("status", "any"))
    include = _listed(request.query_params.get("include", ""))
    return JSONResponse(
        [
            order
            for order in ORDERS
            if ("any" in statuses or order["status"] in statuses)
            and (not include or str(order["id"]) in include)
        ]
    )


def _listed(value: str) -> set[str]:
    return {part.strip() for part in value.split(",") if part.strip()}


async def list_customers(request: Request) -> Response:
    if not secret_equals(request.headers.get("x-api-key"), POWEROFFICE_API_KEY):
        raise ApiError(401, "invalid_api_key", "a valid X-API-Key header is required")
    return JSONResponse(list(CUSTOMERS))
