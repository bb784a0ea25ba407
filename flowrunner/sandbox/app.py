"""Assemble the fake systems into one Starlette app, and serve it on loopback with uvicorn."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flowrunner.sandbox import admin, apikey, ermeo, iobeya, superoffice, tripletex, webcrm
from flowrunner.sandbox.httputil import ApiError
from flowrunner.sandbox.state import SandboxSettings, SandboxState

logger = logging.getLogger(__name__)

_SYSTEMS = (ermeo, iobeya, tripletex, superoffice, webcrm, apikey, admin)
_HTTP_ERROR_NAMES = {404: "not_found", 405: "method_not_allowed"}


class RequestAccounting:
    """Counts each request by route template, then applies any armed fault switch.

    Counting comes first so tests can see that a client really retried a faulted call.
    """

    def __init__(self, app: ASGIApp, state: SandboxState, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.state = state
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        self.state.record_request(f"{scope['method']} {self._template(scope)}")
        # The admin view is never faulted, so a test can always switch faults off again.
        fault = None if path.startswith(admin.ADMIN_PREFIX) else self.state.take_fault(path)
        if fault is not None:
            if fault.delay_seconds:
                await anyio.sleep(fault.delay_seconds)
            if fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                body = {
                    "error": "injected_fault",
                    "error_description": f"sandbox fault armed for {fault.path_prefix}",
                }
                response = JSONResponse(body, status_code=fault.status, headers=headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _template(self, scope: Scope) -> str:
        """The matching route's path template, so /work-orders/WO-1 counts as /{id}."""
        for route in self.routes:
            if isinstance(route, Route) and route.matches(scope)[0] is not Match.NONE:
                return route.path
        return str(scope["path"])


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)  # noqa: S101 - registered for ApiError only
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette answers unknown paths in plain text; the sandbox speaks JSON everywhere.
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    error = _HTTP_ERROR_NAMES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": error, "error_description": exc.detail},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def create_app(
    settings: SandboxSettings | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """Build the sandbox app; its state is reachable at `app.state.sandbox`."""
    state = SandboxState(settings, clock=clock)
    routes = [route for system in _SYSTEMS for route in system.build_routes(state)]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestAccounting, state=state, routes=routes)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
    )
    app.state.sandbox = state
    return app


def serve_sandbox(
    host: str = "127.0.0.1",
    port: int = 8900,
    settings: SandboxSettings | None = None,
) -> None:
    """Run the sandbox in the foreground until interrupted."""
    logger.info("flowrunner sandbox on http://%s:%d (admin view at /_admin/stats)", host, port)
    # No access log: demo credentials travel in query strings (authCode, consumer_secret...).
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_level="info")
