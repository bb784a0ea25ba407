"""A minimal, fast upstream HTTP/1.1 server for bench/engine.py, run in its own process.

    python bench/upstream.py --port PORT [--token TOKEN] [--cpu N]

It is written on raw ``asyncio`` protocols (no framework) so that the server side costs
as little CPU as possible and never becomes the bottleneck of what is measured; it runs
in a separate process, pinned to its own core when the benchmark can, so that it shares
neither the measured event loop nor its CPU accounting. Keep-alive, ``Content-Length``
bodies and pipelined requests are supported; chunked request bodies are not (answered
501, so a client that sends them fails loudly). Binds 127.0.0.1 only.

Endpoints (every one except /health and /stats counts its calls):

- ``GET /customers/{id}`` → 200, a small customer object
- ``POST /orders`` → 201, ``{"id": "ord-N", ...}``
- ``GET /items?n=1000`` → 200, ``{"data": [{"id": "item-0001", ...}, ...], "count": n}``
- ``POST /cards`` → 201, ``{"id": "card-N"}``
- ``GET /health`` → 200 ``ok``; ``GET /stats`` → 200, the counters as JSON

The counters (calls per endpoint, how many carried ``Authorization: Bearer TOKEN``,
request body bytes) let the benchmark check that every variant made the same calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from urllib.parse import parse_qs

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
MAX_ITEMS = 100_000
REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 501: "Not Implemented"}


class Stats:
    def __init__(self, token: str) -> None:
        self.expected_auth = f"Bearer {token}".encode() if token else None
        self.calls: Counter[str] = Counter()
        self.authorized: Counter[str] = Counter()
        self.body_bytes: Counter[str] = Counter()
        self.orders = 0
        self.cards = 0

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "calls": dict(self.calls),
                "authorized": dict(self.authorized),
                "body_bytes": dict(self.body_bytes),
            }
        ).encode()


class _ItemsCache:
    """``GET /items`` bodies, encoded once per size."""

    def __init__(self) -> None:
        self._bodies: dict[int, bytes] = {}

    def get(self, n: int) -> bytes:
        body = self._bodies.get(n)
        if body is None:
            data = [{"id": f"item-{i:04d}", "name": f"Item {i}"} for i in range(1, n + 1)]
            body = self._bodies[n] = json.dumps({"data": data, "count": n}).encode()
        return body


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats, items: _ItemsCache) -> None:
        self.stats = stats
        self.items = items
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        # Bounded: each pass consumes one complete request from the buffer or stops.
        while self.transport is not None and self.buffer:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._reply(400, b'{"error": "header too large"}', close=True)
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._reply(400, b'{"error": "bad request line"}', close=True)
                return
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._reply(501, b'{"error": "chunked bodies are not supported"}', close=True)
                return
            length = int(headers.get("content-length") or 0)
            if length > MAX_BODY:
                self._reply(400, b'{"error": "body too large"}', close=True)
                return
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            close = headers.get("connection", "").lower() == "close"
            status, payload = self._handle(method, target, headers, body)
            self._reply(status, payload, close=close)

    def _handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        path, _, query = target.partition("?")
        stats = self.stats
        if method == "GET" and path == "/health":
            return 200, b'"ok"'
        if method == "GET" and path == "/stats":
            return 200, stats.as_json()
        if method == "GET" and path.startswith("/customers/"):
            key = "GET /customers"
            customer = path.removeprefix("/customers/")
            document = {
                "id": customer,
                "name": f"Customer {customer}",
                "email": f"customer-{customer}@example.com",
                "tier": "gold",
                "address": {"city": "Oslo", "country": "NO"},
            }
            status, payload = 200, json.dumps(document).encode()
        elif method == "POST" and path == "/orders":
            key = "POST /orders"
            stats.orders += 1
            status, payload = 201, b'{"id": "ord-%d", "status": "created"}' % stats.orders
        elif method == "GET" and path == "/items":
            key = "GET /items"
            try:
                n = int(parse_qs(query).get("n", ["1000"])[0])
            except ValueError:
                return 400, b'{"error": "n must be an integer"}'
            status, payload = 200, self.items.get(max(0, min(n, MAX_ITEMS)))
        elif method == "POST" and path == "/cards":
            key = "POST /cards"
            stats.cards += 1
            status, payload = 201, b'{"id": "card-%d"}' % stats.cards
        else:
            return 404, b'{"error": "no such endpoint"}'
        stats.calls[key] += 1
        stats.body_bytes[key] += len(body)
        if stats.expected_auth is not None:
            if headers.get("authorization", "").encode() == stats.expected_auth:
                stats.authorized[key] += 1
        return status, payload

    def _reply(self, status: int, payload: bytes, *, close: bool = False) -> None:
        if self.transport is None:
            return
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n"
        ).encode("latin-1")
        self.transport.write(head + payload)
        if close:
            self.buffer.clear()
            self.transport.close()
            self.transport = None


async def serve(port: int, token: str) -> None:
    loop = asyncio.get_running_loop()
    stats, items = Stats(token), _ItemsCache()
    server = await loop.create_server(
        lambda: UpstreamProtocol(stats, items), host="127.0.0.1", port=port, backlog=1024
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sockname = server.sockets[0].getsockname()
    print(f"listening on 127.0.0.1:{sockname[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--token", default=os.environ.get("BENCH_TOKEN", ""))
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    asyncio.run(serve(args.port, args.token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
