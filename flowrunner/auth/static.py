"""Credentials that are applied as they are: bearer tokens, API keys, Basic, connected user.

Each is an ``httpx.Auth`` flow, so it is applied afresh on every attempt of a request.
"""

from __future__ import annotations

from collections.abc import Generator

import httpx


class HeaderAuth(httpx.Auth):
    """Sets headers (a bearer token, an API key) on every request."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        for name, value in self.headers.items():
            request.headers[name] = value
        yield request


class QueryAuth(httpx.Auth):
    """Adds query parameters (WooCommerce's consumer key and secret) to every request."""

    def __init__(self, params: dict[str, str], headers: dict[str, str] | None = None) -> None:
        self.params = params
        self.headers = headers or {}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.params:
            request.url = request.url.copy_merge_params(self.params)
        for name, value in self.headers.items():
            request.headers[name] = value
        yield request
