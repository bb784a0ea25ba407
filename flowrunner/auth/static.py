"""Credentials that are applied as they are: bearer tokens, API keys, Basic, connected user.

Each is an auth flow (:class:`flowrunner.wire.WireAuth`), so it is applied afresh on
every attempt of a request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from flowrunner.wire import WireAuth, WireRequest, WireResponse, merge_query


class HeaderAuth(WireAuth):
    """Sets headers (a bearer token, an API key) on every request."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    async def auth_flow(self, request: WireRequest) -> AsyncGenerator[WireRequest, WireResponse]:
        for name, value in self.headers.items():
            request.headers[name] = value
        yield request


class QueryAuth(WireAuth):
    """Adds query parameters (WooCommerce's consumer key and secret) to every request."""

    def __init__(self, params: dict[str, str], headers: dict[str, str] | None = None) -> None:
        self.params = params
        self.headers = headers or {}

    async def auth_flow(self, request: WireRequest) -> AsyncGenerator[WireRequest, WireResponse]:
        if self.params:
            request.url = merge_query(request.url, self.params)
        for name, value in self.headers.items():
            request.headers[name] = value
        yield request
