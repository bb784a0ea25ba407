"""Credentials that are applied as they are: bearer tokens, API keys, Basic, connected user.

Each is a :class:`flowrunner.wire.WireAuth`, so it is applied afresh on every attempt of a
request.
"""

from __future__ import annotations

from flowrunner.wire import Wire, WireAuth, WireRequest, WireResponse, merge_query


class HeaderAuth(WireAuth):
    """Sets headers (a bearer token, an API key) on every request."""

    __slots__ = ("headers",)

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    async def exchange(self, wire: Wire, request: WireRequest, body_limit: int) -> WireResponse:
        for name, value in self.headers.items():
            request.headers[name] = value
        return await wire.send(request, body_limit)


class QueryAuth(WireAuth):
    """Adds query parameters (WooCommerce's consumer key and secret) to every request."""

    __slots__ = ("headers", "params")

    def __init__(self, params: dict[str, str], headers: dict[str, str] | None = None) -> None:
        self.params = params
        self.headers = headers or {}

    async def exchange(self, wire: Wire, request: WireRequest, body_limit: int) -> WireResponse:
        if self.params:
            request.url = merge_query(request.url, self.params)
        for name, value in self.headers.items():
            request.headers[name] = value
        return await wire.send(request, body_limit)
