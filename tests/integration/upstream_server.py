"""The upstream server of the integration tests: a Starlette app and what it saw.

Every endpoint that keeps state keys it by a name the test chooses (a fresh uuid), so
tests never see each other's counters. Served by ``conftest.upstream``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

PAGE_SIZE = 3
ITEMS = list(range(1, 9))  # 8 items: pages of 3, 3 and 2
HUGE_CHUNK = b"x" * 65536


@dataclass
class UpstreamState:
    """What the server saw; read by tests from their own thread, hence the lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)
    seen: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def hit(self, key: str, request: Request | None = None) -> int:
        with self.lock:
            self.calls[key] += 1
            if request is not None:
                self.seen.setdefault(key, []).append(
                    {
                        "method": request.method,
                        "url": str(request.url),
                        "headers": dict(request.headers),
                    }
                )
            return self.calls[key]

    def count(self, key: str) -> int:
        with self.lock:
            return self.calls[key]

    def requests(self, key: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.seen.get(key, []))

    def total(self) -> int:
        with self.lock:
            return sum(self.calls.values())


def _page_of(items: list[int], index: int) -> list[dict[str, int]]:
    start = index * PAGE_SIZE
    return [{"id": i, "name": f"item-{i}"} for i in items[start : start + PAGE_SIZE]]


def create_upstream(state: UpstreamState) -> Starlette:
    async def echo(request: Request) -> Response:
        """Method, headers, query and body as received; ?status= and ?key= optional."""
        key = request.query_params.get("key", "echo")
        state.hit(key, request)
        raw = await request.body()
        text = raw.decode("utf-8", errors="replace")
        parsed: Any = None
        if "json" in request.headers.get("content-type", ""):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
        form: dict[str, str] | None = None
        if "form-urlencoded" in request.headers.get("content-type", ""):
            form = dict(parse_qsl(text, keep_blank_values=True))
        payload = {
            "method": request.method,
            "path": request.url.path,
            "host": request.headers.get("host"),
            "headers": dict(request.headers),
            "query": {k: request.query_params.getlist(k) for k in request.query_params},
            "raw_query": request.scope["query_string"].decode("latin-1"),
            "body": text,
            "json": parsed,
            "form": form,
        }
        status = int(request.query_params.get("status", "200"))
        extra = {"X-Echo-Authorization": request.headers.get("authorization", "")}
        return JSONResponse(payload, status_code=status, headers=extra)

    async def next_url_pages(request: Request) -> Response:
        state.hit(request.query_params.get("key", "next"), request)
        index = int(request.query_params.get("page", "0"))
        data = _page_of(ITEMS, index)
        more = (index + 1) * PAGE_SIZE < len(ITEMS)
        key = request.query_params.get("key", "next")
        next_url = f"/pages/next?page={index + 1}&key={key}" if more else None
        return JSONResponse({"data": data, "next": next_url, "page": index})

    async def cursor_pages(request: Request) -> Response:
        state.hit(request.query_params.get("key", "cursor"), request)
        cursor = request.query_params.get("cursor")
        index = int(cursor.removeprefix("c")) if cursor else 0
        more = (index + 1) * PAGE_SIZE < len(ITEMS)
        return JSONResponse(
            {"items": _page_of(ITEMS, index), "cursor": f"c{index + 1}" if more else None}
        )

    async def numbered_pages(request: Request) -> Response:
        state.hit(request.query_params.get("key", "numbered"), request)
        page = int(request.query_params.get("page", "1"))
        data = _page_of(ITEMS, page - 1)
        return JSONResponse({"data": data, "page": page, "last": page * PAGE_SIZE >= len(ITEMS)})

    async def flaky(request: Request) -> Response:
        """Fails ?fail= times with ?status= (and Retry-After from ?after=), then succeeds."""
        key = request.path_params["key"]
        calls = state.hit(key, request)
        fail = int(request.query_params.get("fail", "2"))
        if calls <= fail:
            status = int(request.query_params.get("status", "503"))
            headers: dict[str, str] = {}
            after = request.query_params.get("after")
            if after == "date":
                when = datetime.now(UTC) + timedelta(seconds=30)
                headers["Retry-After"] = format_datetime(when, usegmt=True)
            elif after:
                headers["Retry-After"] = after
            return JSONResponse({"error": "try again", "call": calls}, status, headers=headers)
        return JSONResponse({"ok": True, "calls": calls, "method": request.method})

    async def slow(request: Request) -> Response:
        state.hit(request.query_params.get("key", "slow"), request)
        await asyncio.sleep(float(request.query_params.get("delay", "2")))
        return JSONResponse({"slow": True})

    async def tracked(request: Request) -> Response:
        """Counts requests in flight per key and answers after a random short delay."""
        key = request.path_params["key"]
        state.hit(key, request)
        with state.lock:
            state.in_flight[key] += 1
            state.max_in_flight[key] = max(state.max_in_flight[key], state.in_flight[key])
        try:
            await asyncio.sleep(random.uniform(0.02, 0.08))  # noqa: S311 - test jitter
        finally:
            with state.lock:
                state.in_flight[key] -= 1
        return JSONResponse({"item": request.query_params.get("item")})

    async def text(request: Request) -> Response:
        state.hit("text", request)
        return PlainTextResponse("plain words, not JSON")

    async def bad_json(request: Request) -> Response:
        state.hit("bad-json", request)
        return Response(b'{"truncated": [1, 2', media_type="application/json")

    async def huge(request: Request) -> Response:
        state.hit("huge", request)
        kilobytes = int(request.query_params.get("kb", "0")) or 1024 * 20  # 20 MiB
        pause = float(request.query_params.get("pause", "0"))  # seconds between chunks

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(kilobytes // 64):
                yield HUGE_CHUNK
                if pause:
                    await asyncio.sleep(pause)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def redirect_elsewhere(request: Request) -> Response:
        """Redirects from 127.0.0.1 to the same port under the name localhost."""
        state.hit(request.query_params.get("key", "redirect"), request)
        port = request.url.port
        key = request.query_params.get("key", "redirect")
        return RedirectResponse(f"http://localhost:{port}/landing?key={key}", 302)

    async def moved(request: Request) -> Response:
        """Redirects to /landing on localhost with the same query string, as a redirect to
        an API's canonical host does (query-string credentials included)."""
        state.hit(request.query_params.get("key", "moved"), request)
        port = request.url.port
        return RedirectResponse(f"http://localhost:{port}/landing?{request.url.query}", 301)

    async def landing(request: Request) -> Response:
        key = request.query_params.get("key", "landing")
        state.hit(f"{key}:landing", request)
        return JSONResponse(
            {
                "host": request.headers.get("host"),
                "authorization": "authorization" in request.headers,
                "api_key": "x-api-key" in request.headers,
            }
        )

    async def sized(request: Request) -> Response:
        """?n= bytes with a Content-Length; ?gzip=1 sends them gzip-compressed."""
        state.hit(request.query_params.get("key", "bytes"), request)
        raw = b"y" * int(request.query_params.get("n", "10"))
        if request.query_params.get("gzip"):
            return Response(gzip.compress(raw), headers={"Content-Encoding": "gzip"})
        return Response(raw, media_type="text/plain")

    async def many_headers(request: Request) -> Response:
        """A header sent twice, names in mixed case, and a cookie."""
        state.hit("headers", request)
        response = JSONResponse({"ok": True})
        response.raw_headers += [
            (b"X-Repeated", b"one"),
            (b"X-Repeated", b"two"),
            (b"X-Mixed-Case", b"Value"),
            (b"Set-Cookie", b"session=abc; Path=/"),
        ]
        return response

    async def bounce(request: Request) -> Response:
        """Redirects to ?to= (by default to itself, forever) with the status ?status= (302
        by default)."""
        state.hit(request.query_params.get("key", "bounce"), request)
        status = int(request.query_params.get("status", "302"))
        to = request.query_params.get("to", str(request.url))
        return Response(status_code=status, headers={"Location": to})

    async def token(request: Request) -> Response:
        """An OAuth2 token endpoint: every request gets a bearer token valid for an hour."""
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        state.hit(f"token:{form.get('client_id', '')}", request)
        access = f"upstream-token-{uuid.uuid4().hex[:12]}"
        return JSONResponse({"access_token": access, "token_type": "Bearer", "expires_in": 3600})

    async def create(request: Request) -> Response:
        state.hit(request.query_params.get("key", "create"), request)
        body = await request.json()
        return JSONResponse({"id": 42, **body}, status_code=201)

    return Starlette(
        routes=[
            Route("/echo", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            Route("/pages/next", next_url_pages),
            Route("/pages/cursor", cursor_pages),
            Route("/pages/numbered", numbered_pages),
            Route("/flaky/{key}", flaky, methods=["GET", "POST", "PUT"]),
            Route("/slow", slow),
            Route("/tracked/{key}", tracked),
            Route("/text", text),
            Route("/bad-json", bad_json),
            Route("/huge", huge),
            Route("/redirect", redirect_elsewhere),
            Route("/moved", moved),
            Route("/landing", landing),
            Route("/create", create, methods=["POST"]),
            Route("/oauth/token", token, methods=["POST"]),
            Route("/bytes", sized),
            Route("/headers", many_headers),
            Route("/bounce", bounce, methods=["GET", "POST", "PUT"]),
        ]
    )


@dataclass
class Upstream:
    base_url: str
    port: int
    state: UpstreamState

    def key(self) -> str:
        """A fresh name for one test's counters."""
        return uuid.uuid4().hex[:12]
