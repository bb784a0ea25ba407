"""The sandbox's own control panel: counters, fault switches, expiry and reset (no auth)."""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from flowrunner.sandbox.httputil import invalid_request, json_object
from flowrunner.sandbox.state import Fault, Grant, SandboxState

ADMIN_PREFIX = "/_admin"
MAX_FAULT_DELAY_SECONDS = 60.0


def build_routes(state: SandboxState) -> list[BaseRoute]:
    api = _AdminApi(state)
    return [
        Route(f"{ADMIN_PREFIX}/stats", api.stats, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/faults", api.list_faults, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/faults", api.arm_fault, methods=["POST"]),
        Route(f"{ADMIN_PREFIX}/faults", api.clear_faults, methods=["DELETE"]),
        Route(f"{ADMIN_PREFIX}/ermeo/expire-refresh-tokens", api.expire_refresh, methods=["POST"]),
        Route(f"{ADMIN_PREFIX}/ermeo/expire-access-tokens", api.expire_access, methods=["POST"]),
        Route(f"{ADMIN_PREFIX}/iobeya/bootstrap-token", api.bootstrap_token, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/reset", api.reset, methods=["POST"]),
    ]


def parse_fault(body: dict[str, Any]) -> Fault:
    """Validate a fault switch request; at least a status or a delay is needed."""
    prefix = body.get("path_prefix")
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise invalid_request("path_prefix must be a path starting with /")
    status = body.get("status")
    if status is not None and (not _is_int(status) or not 100 <= status <= 599):
        raise invalid_request("status must be an HTTP status code")
    retry_after = body.get("retry_after")
    if _is_int(retry_after):
        retry_after = str(retry_after)
    if retry_after is not None and not isinstance(retry_after, str):
        raise invalid_request("retry_after must be a string such as '2'")
    delay = body.get("delay_seconds", 0)
    if not _is_number(delay) or not 0 <= delay <= MAX_FAULT_DELAY_SECONDS:
        raise invalid_request(f"delay_seconds must be between 0 and {MAX_FAULT_DELAY_SECONDS:g}")
    times = body.get("times", 1)
    if not _is_int(times) or times < 1:
        raise invalid_request("times must be a positive integer")
    if status is None and delay == 0:
        raise invalid_request("a fault needs a status, a delay_seconds, or both")
    return Fault(prefix, status, retry_after, float(delay), times)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _lapse(grants: dict[str, Grant], now: float) -> int:
    """Make every still-valid grant expire now; return how many were affected."""
    live = [grant for grant in grants.values() if grant.expires_at > now]
    for grant in live:
        grant.expires_at = now
    return len(live)


class _AdminApi:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.state.stats())

    async def list_faults(self, request: Request) -> Response:
        return JSONResponse([fault.as_dict() for fault in self.state.faults])

    async def arm_fault(self, request: Request) -> Response:
        fault = parse_fault(await json_object(request))
        self.state.arm_fault(fault)
        return JSONResponse(fault.as_dict(), status_code=201)

    async def clear_faults(self, request: Request) -> Response:
        self.state.clear_faults()
        return JSONResponse({"faults": []})

    async def expire_refresh(self, request: Request) -> Response:
        expired = _lapse(self.state.ermeo.refresh_tokens, self.state.clock())
        return JSONResponse({"expired": expired})

    async def expire_access(self, request: Request) -> Response:
        expired = _lapse(self.state.ermeo.access_tokens, self.state.clock())
        return JSONResponse({"expired": expired})

    async def bootstrap_token(self, request: Request) -> Response:
        issued = self.state.iobeya_bootstrap
        return JSONResponse(
            {
                "user": issued.user,
                "token": issued.token,
                "jti": issued.jti,
                "expires_at": issued.expires_at_iso,
            }
        )

    async def reset(self, request: Request) -> Response:
        self.state.reset()
        return JSONResponse({"reset": True})
