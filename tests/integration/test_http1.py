"""Http1Wire (flowrunner.http1) against real servers on 127.0.0.1: raw asyncio servers that
write the exact bytes each test needs, and count the connections they accept."""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import ipaddress
import socket
import ssl
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from flowrunner.http1 import (
    KEEPALIVE_SECONDS,
    MAX_CONNECTIONS,
    MAX_RESPONSE_HEAD_BYTES,
    Http1Transport,
    Http1Wire,
)
from flowrunner.wire import WireConnectionError, WireRequest, WireTimeout, parse_url

LIMIT = 1_000_000
TEXT = b"flowrunner sends this text, compressed, over and over. " * 40


# ---------------------------------------------------------------- a raw server


class Seen:
    """A request as the server read it off the wire."""

    def __init__(
        self,
        connection: int,
        line: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        self.connection = connection
        self.line = line
        self.method, self.target, self.version = line.split(" ")
        self.headers = headers
        self.body = body

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class Peer:
    """One connection the server accepted."""

    def __init__(
        self,
        server: RawServer,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.index = index
        self.reader = reader
        self.writer = writer
        self.eof = False  # the client closed the connection
        self.done = False  # the server's side of it is over

    async def request(self) -> Seen | None:
        """The next request on this connection; None once the client has closed it."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof = True
            return None
        line, *rest = head.decode("latin-1").split("\r\n")
        headers = [(name, value) for name, value in (h.split(": ", 1) for h in rest if h)]
        lengths = [int(v) for n, v in headers if n.lower() == "content-length"]
        body = await self.reader.readexactly(lengths[0]) if lengths else b""
        seen = Seen(self.index, line, headers, body)
        self.server.seen.append(seen)
        return seen

    async def until_eof(self) -> None:
        """Wait for the client to close the connection, answering nothing more."""
        while await self.request() is not None:
            pass

    async def send(self, *pieces: bytes, pause: float = 0.0) -> None:
        """Write ``pieces`` one after another, ``pause`` seconds apart."""
        for number, piece in enumerate(pieces):
            if number and pause:
                await asyncio.sleep(pause)
            self.writer.write(piece)
            await self.writer.drain()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """A server on 127.0.0.1 that runs ``handler`` on every connection it accepts."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.open = 0  # connections accepted and not over yet
        self.max_open = 0
        self.seen: list[Seen] = []
        self.peers: list[Peer] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.scheme = "http"
        self.port = 0

    async def start(self, context: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self.server.sockets[0].getsockname()[1]
        self.scheme = "https" if context else "http"

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def requests(self) -> list[tuple[int, str]]:
        """(connection, request line) of every request seen, in order."""
        return [(seen.connection, f"{seen.method} {seen.target}") for seen in self.seen]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = Peer(self, self.accepted, reader, writer)
        self.peers.append(peer)
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client hung up, or the test is over
        finally:
            self.open -= 1
            peer.done = True
            writer.close()
            with suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            self.tasks.discard(task)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.wait_closed()


def answer(
    body: bytes = b"",
    *headers: str,
    status: str = "200 OK",
    version: str = "HTTP/1.1",
    length: bool = True,
) -> bytes:
    """A response's bytes: the status line, ``headers`` and, unless told not to, a
    Content-Length that fits ``body``."""
    lines = [f"{version} {status}", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def echoed(seen: Seen) -> bytes:
    return f"{seen.method} {seen.target}".encode() + (b" " + seen.body if seen.body else b"")


async def echo(peer: Peer) -> None:
    """Answer every request with its method, target and body."""
    while (seen := await peer.request()) is not None:
        await peer.send(answer(echoed(seen)))


def slow_echo(delay: float) -> Handler:
    async def handle(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            await asyncio.sleep(delay)
            await peer.send(answer(echoed(seen)))

    return handle


ServerFactory = Callable[..., Awaitable[RawServer]]
WireFactory = Callable[..., Http1Wire]


@pytest.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    started: list[RawServer] = []

    async def start(handler: Handler = echo, context: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(handler)
        await server.start(context)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


@pytest.fixture
async def make_wire() -> AsyncIterator[WireFactory]:
    opened: list[Http1Wire] = []

    def make(
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = MAX_CONNECTIONS,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
    ) -> Http1Wire:
        wire = Http1Wire(ssl_context, max_connections, keepalive_seconds)
        opened.append(wire)
        return wire

    yield make
    for wire in opened:
        await wire.aclose()


@pytest.fixture
def wire(make_wire: WireFactory) -> Http1Wire:
    return make_wire()


def request(
    method: str,
    url: str,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 2.0,
) -> WireRequest:
    return WireRequest(method, parse_url(url), CIMultiDict(headers or {}), content, timeout)


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> WireRequest:
    return request("GET", url, None, headers, timeout)


async def eventually(check: Callable[[], bool], within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------- keep-alive


async def test_sequential_requests_share_one_connection_with_the_right_head_and_body(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """Requests one after another reuse one connection; each states the right request
    line and Host; a POST body arrives whole with its own length, whatever framing
    headers the request carried."""
    server = await serve()
    for path in ("/a", "/b?x=1&y=%2F", "/c"):
        response = await wire.send(get(server.url(path)), LIMIT)
        assert (response.status_code, response.content) == (200, f"GET {path}".encode())
    body = b'{"name": "flowrunner"}'
    framing = {"Content-Length": "999", "Transfer-Encoding": "chunked"}
    posted = await wire.send(request("POST", server.url("/p"), body, framing), LIMIT)
    empty = await wire.send(request("POST", server.url("/e")), LIMIT)
    assert posted.content == b"POST /p " + body
    assert empty.content == b"POST /e"
    assert server.accepted == 1
    assert [seen.line for seen in server.seen] == [
        "GET /a HTTP/1.1",
        "GET /b?x=1&y=%2F HTTP/1.1",
        "GET /c HTTP/1.1",
        "POST /p HTTP/1.1",
        "POST /e HTTP/1.1",
    ]
    for seen in server.seen:
        assert seen.header("Host") == [f"127.0.0.1:{server.port}"]
        assert seen.header("Transfer-Encoding") == []
    assert server.seen[3].header("Content-Length") == [str(len(body))]
    assert server.seen[3].body == body
    assert server.seen[4].header("Content-Length") == ["0"]
    assert server.seen[0].header("Content-Length") == []


async def test_an_idle_connection_the_server_closed_is_replaced(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """The server closes a kept-alive connection a little after answering: the next
    request goes out on a new connection and gets its answer."""

    async def answer_once_then_close(peer: Peer) -> None:
        if peer.index == 0:
            seen = await peer.request()
            assert seen is not None
            await peer.send(answer(echoed(seen)))
            await asyncio.sleep(0.05)
            return
        await echo(peer)

    server = await serve(answer_once_then_close)
    assert (await wire.send(get(server.url("/1")), LIMIT)).content == b"GET /1"
    await eventually(lambda: server.peers[0].done)
    await asyncio.sleep(0.02)
    assert (await wire.send(get(server.url("/2")), LIMIT)).content == b"GET /2"
    assert server.requests() == [(0, "GET /1"), (1, "GET /2")]


def read_the_second_request_and_close(outcome: list[str]) -> Handler:
    """Connection 0 answers its first request, reads the second and closes unanswered
    (the race of a server closing an idle connection as it is reused); later connections
    echo."""

    async def handle(peer: Peer) -> None:
        if peer.index > 0:
            await echo(peer)
            return
        first = await peer.request()
        assert first is not None
        await peer.send(answer(echoed(first)))
        second = await peer.request()
        outcome.append("closed unanswered" if second is not None else "eof")

    return handle


async def test_a_get_lost_by_a_reused_connection_is_sent_again_on_a_new_one(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    outcome: list[str] = []
    server = await serve(read_the_second_request_and_close(outcome))
    await wire.send(get(server.url("/1")), LIMIT)
    response = await wire.send(get(server.url("/2")), LIMIT)
    assert response.content == b"GET /2"
    assert outcome == ["closed unanswered"]
    assert server.requests() == [(0, "GET /1"), (0, "GET /2"), (1, "GET /2")]


async def test_a_post_lost_by_a_reused_connection_is_not_sent_again(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    outcome: list[str] = []
    server = await serve(read_the_second_request_and_close(outcome))
    await wire.send(get(server.url("/1")), LIMIT)
    with pytest.raises(WireConnectionError) as failed:
        await wire.send(request("POST", server.url("/pay"), b"amount=10"), LIMIT)
    # Not a ConnectError, which says nothing was sent: the server may have taken it.
    assert failed.value.kind == "RemoteProtocolError"
    assert outcome == ["closed unanswered"]
    await asyncio.sleep(0.05)
    assert server.requests() == [(0, "GET /1"), (0, "POST /pay")]
    assert server.accepted == 1


# ---------------------------------------------------------------- response framing


async def test_a_chunked_body_is_read_whole_and_the_connection_kept(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    async def chunked_then_echo(peer: Peer) -> None:
        first = await peer.request()
        assert first is not None
        await peer.send(
            answer(
                b"",
                "Transfer-Encoding: chunked",
                "Content-Type: text/plain; charset=iso-8859-1",
                length=False,
            ),
            chunk(b"hello"),
            chunk(b", w\xf6rld"),
            b"0\r\nX-Trailer: t\r\n\r\n",
            pause=0.01,
        )
        await echo(peer)

    server = await serve(chunked_then_echo)
    response = await wire.send(get(server.url("/c")), LIMIT)
    assert response.content == b"hello, w\xf6rld"
    assert response.text == "hello, wörld"
    after = await wire.send(get(server.url("/next")), LIMIT)
    assert after.content == b"GET /next"
    assert server.accepted == 1


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
async def test_a_body_that_ends_when_the_server_closes_is_read_whole(
    serve: ServerFactory, wire: Http1Wire, version: str
) -> None:
    """No Content-Length, no chunks: the body runs until the server closes; the next
    request goes out on a new connection."""

    async def until_close(peer: Peer) -> None:
        if peer.index > 0:
            await echo(peer)
            return
        assert await peer.request() is not None
        await peer.send(
            answer(b"", version=version, length=False), b"part one, ", b"part two", pause=0.01
        )

    server = await serve(until_close)
    response = await wire.send(get(server.url("/stream")), LIMIT)
    assert (response.status_code, response.content) == (200, b"part one, part two")
    assert (await wire.send(get(server.url("/next")), LIMIT)).content == b"GET /next"
    assert server.requests() == [(0, "GET /stream"), (1, "GET /next")]


async def test_an_http_1_0_answer_does_not_keep_its_connection(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """An HTTP/1.0 answer with a Content-Length, on a connection the server leaves open:
    the body is read by its length, and the next request does not go out on it (an
    HTTP/1.0 server answers one request per connection)."""

    async def one_answer_per_connection(peer: Peer) -> None:
        seen = await peer.request()
        assert seen is not None
        await peer.send(answer(echoed(seen), version="HTTP/1.0"))
        await peer.request()  # a second request here would never be answered

    server = await serve(one_answer_per_connection)
    for path in ("/1", "/2"):
        response = await wire.send(get(server.url(path), timeout=1.0), LIMIT)
        assert response.content == f"GET {path}".encode()
    assert server.requests() == [(0, "GET /1"), (1, "GET /2")]


@pytest.mark.parametrize("pause", [0.0, 0.02], ids=["one-write", "three-writes"])
async def test_informational_answers_before_the_real_one_are_skipped(
    serve: ServerFactory, wire: Http1Wire, pause: float
) -> None:
    async def informational_first(peer: Peer) -> None:
        seen = await peer.request()
        assert seen is not None
        pieces = (
            answer(status="100 Continue", length=False),
            answer(b"", "Link: </style.css>; rel=preload", status="103 Early Hints", length=False),
            answer(b"created", "X-Real: yes", status="201 Created"),
        )
        await peer.send(*(pieces if pause else (b"".join(pieces),)), pause=pause)
        await echo(peer)

    server = await serve(informational_first)
    response = await wire.send(request("POST", server.url("/new"), b"{}"), LIMIT)
    assert (response.status_code, response.content) == (201, b"created")
    assert response.headers["X-Real"] == "yes"
    assert "Link" not in response.headers
    assert (await wire.send(get(server.url("/next")), LIMIT)).content == b"GET /next"
    assert server.accepted == 1


async def test_endless_informational_answers_fail_the_exchange(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """A server that sends 1xx answers and never the real one is cut off after a few,
    not left to run until the request's timeout."""

    async def endless_continue(peer: Peer) -> None:
        assert await peer.request() is not None
        try:
            for _ in range(1000):
                await peer.send(answer(status="100 Continue", length=False))
                await asyncio.sleep(0.001)
        except ConnectionError:  # the client hung up, as it should
            return

    server = await serve(endless_continue)
    started = time.monotonic()
    with pytest.raises(WireConnectionError) as failed:
        await wire.send(get(server.url("/slow"), timeout=10), LIMIT)
    assert failed.value.kind == "RemoteProtocolError"
    assert "informational" in failed.value.message
    assert time.monotonic() - started < 2


async def test_bytes_after_the_answer_are_never_read_as_the_next_answer(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """A server that writes a second answer nobody asked for, with the first: the
    connection is not reused, so the next request gets its own answer, not that one."""

    async def answer_twice_then_echo(peer: Peer) -> None:
        if peer.index == 0:
            assert await peer.request() is not None
            await peer.send(answer(b"first") + answer(b"unasked"))
        await echo(peer)

    server = await serve(answer_twice_then_echo)
    assert (await wire.send(get(server.url("/one")), LIMIT)).content == b"first"
    assert (await wire.send(get(server.url("/two")), LIMIT)).content == b"GET /two"
    assert server.accepted == 2


async def test_a_204_has_no_body_and_keeps_the_connection(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    async def no_content_then_echo(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(answer(b"", "X-Done: 1", status="204 No Content", length=False))
        await echo(peer)

    server = await serve(no_content_then_echo)
    response = await wire.send(request("DELETE", server.url("/item/1")), LIMIT)
    assert (response.status_code, response.content) == (204, b"")
    assert response.headers["X-Done"] == "1"
    assert (await wire.send(get(server.url("/next")), LIMIT)).content == b"GET /next"
    assert server.accepted == 1


async def test_a_head_answer_announcing_a_length_returns_at_once_without_a_body(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    async def head_then_echo(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            if seen.method == "HEAD":
                await peer.send(answer(b"", "Content-Length: 100", length=False))
            else:
                await peer.send(answer(echoed(seen)))

    server = await serve(head_then_echo)
    started = time.monotonic()
    response = await wire.send(request("HEAD", server.url("/file")), LIMIT)
    assert time.monotonic() - started < 0.5
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["Content-Length"] == "100"
    assert (await wire.send(get(server.url("/next")), LIMIT)).content == b"GET /next"


# ---------------------------------------------------------------- content encodings


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encoding", "pieces", "expected"),
    [
        ("deflate", [zlib.compress(TEXT)], TEXT),
        ("deflate", [raw_deflate(TEXT)], TEXT),
        # A streaming server's first chunk may be a single byte.
        ("deflate", [raw_deflate(TEXT)[:1], raw_deflate(TEXT)[1:]], TEXT),
        ("deflate", [zlib.compress(TEXT)[:1], zlib.compress(TEXT)[1:]], TEXT),
        ("br", [b"\x1b\x03\x00\xf8\xa5\x40\xc2\xa2\x01"], b"\x1b\x03\x00\xf8\xa5\x40\xc2\xa2\x01"),
    ],
    ids=["zlib-deflate", "raw-deflate", "raw-deflate-1-byte-first", "zlib-1-byte-first", "br"],
)
async def test_deflate_bodies_are_decoded_and_unknown_encodings_passed_through(
    serve: ServerFactory, wire: Http1Wire, encoding: str, pieces: list[bytes], expected: bytes
) -> None:
    async def encoded(peer: Peer) -> None:
        while await peer.request() is not None:
            head = answer(
                b"",
                f"Content-Encoding: {encoding}",
                "Transfer-Encoding: chunked",
                length=False,
            )
            await peer.send(head, *(chunk(p) for p in pieces), b"0\r\n\r\n", pause=0.02)

    server = await serve(encoded)
    response = await wire.send(get(server.url("/z")), LIMIT)
    assert response.content == expected
    assert response.headers["Content-Encoding"] == encoding


async def test_a_corrupt_gzip_body_fails_as_a_decoding_error(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    compressed = bytearray(gzip.compress(TEXT))
    compressed[-6] ^= 0xFF  # the CRC of the data no longer matches
    garbled = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 40
    cut = gzip.compress(TEXT)[:-12]  # the stream stops before its end (and its checksum)

    corrupt = [bytes(compressed), garbled, cut]

    async def corrupt_then_echo(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            if corrupt:
                await peer.send(answer(corrupt.pop(0), "Content-Encoding: gzip"))
            else:
                await peer.send(answer(echoed(seen)))

    server = await serve(corrupt_then_echo)
    for _ in range(3):
        with pytest.raises(WireConnectionError) as failed:
            await wire.send(get(server.url("/gz")), LIMIT)
        assert failed.value.kind == "DecodingError"
    assert (await wire.send(get(server.url("/next")), LIMIT)).content == b"GET /next"


# ---------------------------------------------------------------- oversized heads


def header_lines(total: int) -> list[bytes]:
    """Header lines of about 1 KB each, ``total`` bytes in all."""
    return [f"X-Filler-{i}: {'a' * 1000}\r\n".encode() for i in range(total // 1014 + 1)]


@pytest.mark.parametrize("size", [MAX_RESPONSE_HEAD_BYTES + 8192, 4 * MAX_RESPONSE_HEAD_BYTES])
async def test_a_head_over_the_limit_in_one_write_is_refused(
    serve: ServerFactory, wire: Http1Wire, size: int
) -> None:
    """A head just past the limit, or several times it, that the server writes at once
    (so it may come in a single read) is refused, even though it is complete."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(header_lines(size)) + b"Content-Length: 2\r\n\r\nok"

    async def big_head_then_echo(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            await peer.send(head if seen.target == "/big" else answer(echoed(seen)))

    server = await serve(big_head_then_echo)
    with pytest.raises(WireConnectionError) as failed:
        await wire.send(get(server.url("/big")), LIMIT)
    assert failed.value.kind == "RemoteProtocolError"
    assert str(MAX_RESPONSE_HEAD_BYTES) in failed.value.message
    assert (await wire.send(get(server.url("/next")), LIMIT)).content == b"GET /next"


async def test_a_head_under_the_limit_is_read(serve: ServerFactory, wire: Http1Wire) -> None:
    lines = header_lines(MAX_RESPONSE_HEAD_BYTES - 4096)
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(lines) + b"Content-Length: 2\r\n\r\nok"

    async def large_head(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(head)

    server = await serve(large_head)
    response = await wire.send(get(server.url("/large")), LIMIT)
    assert response.content == b"ok"
    assert len(response.headers) == len(lines) + 1


async def test_an_endless_head_in_small_writes_is_cut_short_without_using_much_memory(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """The server writes header lines of 1 KB, 16 MB of them at most: the client stops
    reading past the limit and hangs up, long before the 16 MB, and holds little of it."""
    sent: list[int] = [0]
    budget = 16 * 1024 * 1024

    async def endless_head(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        number = 0
        while sent[0] < budget:
            line = f"X-Filler-{number}: {'a' * 1000}\r\n".encode()
            peer.writer.write(line)
            sent[0] += len(line)
            number += 1
            await peer.writer.drain()
        await peer.send(b"Content-Length: 0\r\n\r\n")

    server = await serve(endless_head)
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(WireConnectionError) as failed:
            await wire.send(get(server.url("/endless"), timeout=5.0), LIMIT)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert failed.value.kind == "RemoteProtocolError"
    assert elapsed < 1.0
    await eventually(lambda: server.peers[0].done)
    assert sent[0] < budget / 2
    assert peak < 4 * 1024 * 1024


# ---------------------------------------------------------------- request headers


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Note": "x\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil"},
        {"X-Note": "x\nX-Injected: 1"},
        {"X-Note\r\nX-Injected": "1"},
    ],
    ids=["crlf-in-value", "lf-in-value", "crlf-in-name"],
)
async def test_a_header_with_a_line_break_is_refused_and_nothing_sent(
    serve: ServerFactory, wire: Http1Wire, headers: dict[str, str]
) -> None:
    server = await serve()
    with pytest.raises(WireConnectionError) as refused:
        await wire.send(get(server.url("/first"), headers), LIMIT)
    assert refused.value.kind == "InvalidHeader"
    await asyncio.sleep(0.05)
    assert server.accepted == 0  # no connection opened for it
    await wire.send(get(server.url("/ok")), LIMIT)
    with pytest.raises(WireConnectionError) as again:
        await wire.send(request("POST", server.url("/second"), b"data", headers), LIMIT)
    assert again.value.kind == "InvalidHeader"
    assert (await wire.send(get(server.url("/after")), LIMIT)).content == b"GET /after"
    assert server.requests() == [(0, "GET /ok"), (0, "GET /after")]
    assert all(not seen.header("X-Injected") and not seen.body for seen in server.seen)


async def test_credentials_in_the_url_become_a_basic_authorization_header(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    server = await serve()
    url = f"http://alice:s%3Acr%C3%A9t@127.0.0.1:{server.port}/private"
    await wire.send(get(url), LIMIT)
    await wire.send(get(url, {"Authorization": "Bearer own"}), LIMIT)
    plain, own = server.seen
    expected = base64.b64encode("alice:s:crét".encode()).decode()
    assert plain.header("Authorization") == [f"Basic {expected}"]
    assert plain.line == "GET /private HTTP/1.1"
    assert plain.header("Host") == [f"127.0.0.1:{server.port}"]
    assert own.header("Authorization") == ["Bearer own"]


# ---------------------------------------------------------------- the pool


async def test_at_most_max_connections_are_open_and_every_request_is_answered(
    serve: ServerFactory, make_wire: WireFactory
) -> None:
    server = await serve(slow_echo(0.05))
    wire = make_wire(max_connections=2)
    responses = await asyncio.gather(
        *(wire.send(get(server.url(f"/{i}")), LIMIT) for i in range(5))
    )
    assert sorted(r.content for r in responses) == [f"GET /{i}".encode() for i in range(5)]
    assert server.max_open <= 2
    assert wire.open_connections <= 2
    assert server.accepted == 2  # the waiting requests reuse the connections freed


async def test_an_idle_connection_to_another_host_is_closed_to_make_room(
    serve: ServerFactory, make_wire: WireFactory
) -> None:
    first, second = await serve(), await serve()
    wire = make_wire(max_connections=1)
    assert (await wire.send(get(first.url("/a")), LIMIT)).content == b"GET /a"
    response = await asyncio.wait_for(wire.send(get(second.url("/b")), LIMIT), 1.5)
    assert response.content == b"GET /b"
    await eventually(lambda: first.peers[0].eof)
    assert wire.open_connections == 1


async def test_a_timed_out_exchange_leaves_no_connection_behind(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """The first request times out; its answer comes later on that connection. The next
    request opens a new connection and reads its own answer, not the late one."""

    async def late_first(peer: Peer) -> None:
        if peer.index == 0:
            assert await peer.request() is not None
            await asyncio.sleep(0.4)
            await peer.send(answer(b"late"))
        await echo(peer)

    server = await serve(late_first)
    started = time.monotonic()
    with pytest.raises(WireTimeout):
        await wire.send(get(server.url("/slow"), timeout=0.15), LIMIT)
    assert time.monotonic() - started < 0.35
    assert wire.open_connections == 0
    response = await wire.send(get(server.url("/next")), LIMIT)
    assert response.content == b"GET /next"
    assert server.requests() == [(0, "GET /slow"), (1, "GET /next")]


async def test_aclose_closes_open_connections_and_refuses_new_requests(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    server = await serve(slow_echo(0.05))
    await asyncio.gather(*(wire.send(get(server.url(f"/{i}")), LIMIT) for i in range(2)))
    assert server.accepted == 2
    assert wire.open_connections == 2
    await wire.aclose()
    assert wire.open_connections == 0
    await eventually(lambda: all(peer.eof for peer in server.peers))
    with pytest.raises(RuntimeError, match="closed"):
        await wire.send(get(server.url("/later")), LIMIT)
    assert server.accepted == 2


async def test_aclose_ends_a_request_in_flight_at_once(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    async def never_answer(peer: Peer) -> None:
        await peer.until_eof()

    server = await serve(never_answer)
    pending = asyncio.create_task(wire.send(get(server.url("/hang"), timeout=10.0), LIMIT))
    await eventually(lambda: len(server.seen) == 1)
    await wire.aclose()
    with pytest.raises((WireConnectionError, RuntimeError)):
        await asyncio.wait_for(pending, 1.0)
    await eventually(lambda: server.peers[0].eof)


# ---------------------------------------------------------------- TLS


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, signed by its own key: (certificate, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowrunner test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_with_a_trusted_certificate_and_refused_without(
    serve: ServerFactory, make_wire: WireFactory, tmp_path: Path
) -> None:
    cert_path, key_path = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)
    server = await serve(echo, server_context)
    assert server.url().startswith("https://127.0.0.1:")

    trusting = make_wire(ssl_context=ssl.create_default_context(cafile=str(cert_path)))
    for path in ("/secure", "/again"):
        response = await trusting.send(get(server.url(path)), LIMIT)
        assert (response.status_code, response.content) == (200, f"GET {path}".encode())
    assert server.accepted == 1

    with pytest.raises(WireConnectionError) as refused:
        await make_wire().send(get(server.url("/secure")), LIMIT)
    assert refused.value.kind == "ConnectError"
    assert "certificate" in refused.value.message
    assert server.requests() == [(0, "GET /secure"), (0, "GET /again")]


# ---------------------------------------------------------------- limits and leftovers


async def test_bytes_after_a_gzip_body_fail_it_and_a_second_member_is_read(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """After the end of a gzip stream, more junk is refused at once (not piled up past
    the limit); a second gzip member, as `gzip` appends them, is decoded too."""
    junk = gzip.compress(b"ok") + b"\x00" * (4 * 1024 * 1024)
    members = gzip.compress(b"one,") + gzip.compress(b"two")

    async def gzip_answers(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            body = junk if seen.target == "/junk" else members
            await peer.send(answer(body, "Content-Encoding: gzip"))

    server = await serve(gzip_answers)
    started = time.monotonic()
    with pytest.raises(WireConnectionError) as failed:
        await wire.send(get(server.url("/junk")), 1000)
    assert failed.value.kind == "DecodingError"
    assert time.monotonic() - started < 1.0
    assert (await wire.send(get(server.url("/two")), LIMIT)).content == b"one,two"


async def test_trailers_are_dropped_and_bounded(serve: ServerFactory, wire: Http1Wire) -> None:
    """Trailer fields after a chunked body never become headers of the answer, and an
    endless trailer fails like an endless head."""

    async def trailers(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            head = answer(b"", "Transfer-Encoding: chunked", length=False)
            if seen.target == "/small":
                await peer.send(head + chunk(b"hello") + b"0\r\nLocation: /elsewhere\r\n\r\n")
                continue
            await peer.send(head + chunk(b"hello") + b"0\r\n")
            for number in range(200):
                await peer.send(f"X-T-{number}: {'t' * 1000}\r\n".encode())
            await peer.send(b"\r\n")

    server = await serve(trailers)
    small = await wire.send(get(server.url("/small")), LIMIT)
    assert (small.content, "Location" in small.headers) == (b"hello", False)
    with pytest.raises(WireConnectionError) as failed:
        await wire.send(get(server.url("/endless")), LIMIT)
    assert failed.value.kind == "RemoteProtocolError"


async def test_a_body_in_tiny_chunks_costs_about_its_size_and_is_not_kept(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """200 KB in one-byte chunks is held in one buffer (a list of 200,000 pieces weighs
    about 8 MB), and the idle connection keeps none of it once answered. The peak counts
    the test server's side too (the 1.2 MB it writes, in the transport's buffer)."""
    size = 200_000
    head = answer(b"", "Transfer-Encoding: chunked", length=False)
    payload = head + b"1\r\nx\r\n" * size + b"0\r\n\r\n"  # 1.2 MB, built beforehand

    async def tiny_chunks(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(payload)

    server = await serve(tiny_chunks)
    tracemalloc.start()
    try:
        response = await wire.send(get(server.url("/tiny")), LIMIT)
        assert response.content == b"x" * size
        _, peak = tracemalloc.get_traced_memory()
        del response
        await asyncio.sleep(0)  # the loop lets go of the future that carried it
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000
    assert held < 100_000
    assert wire.open_connections == 1  # kept alive, without the body


async def test_a_304_announcing_a_large_length_is_not_refused(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """A 304 may give the length of the resource it stands for: no body comes, so the
    body limit does not apply, and the connection stays usable."""

    async def not_modified(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50000000\r\n\r\n")
        await echo(peer)

    server = await serve(not_modified)
    response = await wire.send(get(server.url("/cached")), 1000)
    assert (response.status_code, response.content) == (304, b"")
    assert (await wire.send(get(server.url("/next")), LIMIT)).content == b"GET /next"
    assert server.accepted == 1


async def test_an_early_answer_to_an_upload_does_not_leave_the_rest_for_the_next(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """The server answers 401 after reading only the head of a large POST: the connection
    still holds the unsent body, so it is not reused; the next request (what an auth flow
    sends after a refresh) goes out on a new connection and gets its own answer."""

    async def refuse_early(peer: Peer) -> None:
        if peer.index == 0:
            await peer.reader.readuntil(b"\r\n\r\n")
            await peer.send(answer(b"no", status="401 Unauthorized"))
            await asyncio.sleep(0.3)  # reads nothing more, then hangs up
            return
        await echo(peer)

    server = await serve(refuse_early)
    upload = request("POST", server.url("/upload"), b"x" * (16 * 1024 * 1024))
    first = await wire.send(upload, LIMIT)
    assert first.status_code == 401
    again = await wire.send(request("POST", server.url("/upload"), b"small"), LIMIT)
    assert again.content == b"POST /upload small"
    assert server.accepted == 2


async def test_a_timed_out_upload_closes_its_socket_at_once(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """An exchange cut short drops its connection without flushing the unsent body: the
    server sees it end, and the socket does not outlive the pool's count."""

    async def never_read(peer: Peer) -> None:
        await asyncio.sleep(5)

    server = await serve(never_read)
    with pytest.raises(WireTimeout):
        await wire.send(
            request("POST", server.url("/big"), b"x" * (16 * 1024 * 1024), None, 0.2), LIMIT
        )
    assert wire.open_connections == 0
    body_size = 16 * 1024 * 1024
    received = 0  # what reaches the server from now on: what was in flight, not the rest
    with suppress(ConnectionError):
        while data := await asyncio.wait_for(server.peers[0].reader.read(65536), 1.0):
            received += len(data)
    assert received < body_size / 2


async def test_idle_connections_are_closed_after_the_keepalive(
    serve: ServerFactory, make_wire: WireFactory
) -> None:
    wire = make_wire(keepalive_seconds=0.2)
    server = await serve()
    await wire.send(get(server.url("/once")), LIMIT)
    assert wire.open_connections == 1
    await eventually(lambda: server.peers[0].eof, within=1.5)
    assert wire.open_connections == 0


async def test_a_request_that_says_connection_close_is_not_reused(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    server = await serve()  # answers with keep-alive whatever the request says
    await wire.send(get(server.url("/a"), {"Connection": "close"}), LIMIT)
    await wire.send(request("POST", server.url("/b"), b"x"), LIMIT)
    assert server.requests() == [(0, "GET /a"), (1, "POST /b")]


async def test_header_values_in_utf_8_are_read_as_such(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    async def utf8_header(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(answer(b"", "X-Message: héllo".encode().decode("latin-1"), "X-Old: \xe9"))

    server = await serve(utf8_header)
    response = await wire.send(get(server.url("/h")), LIMIT)
    assert response.headers["X-Message"] == "héllo"
    assert response.headers["X-Old"] == "é"  # not UTF-8: read as Latin-1


async def test_the_header_dict_has_lower_case_names_and_repeated_ones_joined(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """What a step's result and the history show: every name lower-cased, a header sent
    twice (in any case) as one value joined with ", ", in the order they came."""

    async def repeated(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(answer(b"ok", "Set-Cookie: a=1", "X-Note: h\xe9", "set-cookie: b=2"))

    server = await serve(repeated)
    response = await wire.send(get(server.url("/h")), LIMIT)
    headers = response.header_dict()
    assert headers["set-cookie"] == "a=1, b=2"
    assert headers["x-note"] == "hé"
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert all(name == name.lower() for name in headers)
    # The same as the dict made from the response's headers themselves.
    expected: dict[str, str] = {}
    for name, value in response.headers.items():
        key = name.lower()
        expected[key] = f"{expected[key]}, {value}" if key in expected else value
    assert headers == expected


@pytest.mark.parametrize(
    "headers",
    [{"Transfer-Encoding ": "chunked"}, {"": "x"}, {"X-Note": "a\x00b"}, {"X Note": "x"}],
    ids=["space-before-colon", "empty-name", "nul-in-value", "space-in-name"],
)
async def test_header_names_must_be_tokens_and_values_free_of_controls(
    serve: ServerFactory, wire: Http1Wire, headers: dict[str, str]
) -> None:
    server = await serve()
    with pytest.raises(WireConnectionError) as refused:
        await wire.send(request("POST", server.url("/x"), b"data", headers), LIMIT)
    assert refused.value.kind == "InvalidHeader"
    assert server.accepted == 0


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that takes no connection: a listening socket whose backlog is
    full, so the kernel drops further SYNs and a connect hangs."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    filler: list[socket.socket] = []
    try:
        for _ in range(4):  # fill the backlog, never accepted
            extra = socket.socket()
            extra.setblocking(False)
            with suppress(BlockingIOError):
                extra.connect(silent.getsockname())
            filler.append(extra)
        yield silent.getsockname()[1]
    finally:
        for sock in [*filler, silent]:
            sock.close()


async def test_an_address_that_does_not_answer_is_passed_over_after_a_moment(
    serve: ServerFactory, wire: Http1Wire, monkeypatch: pytest.MonkeyPatch, silent_port: int
) -> None:
    """Happy eyeballs: a host's first address takes no connection, its second does. The
    request goes out on the second a quarter second later, not after the first times
    out."""
    server = await serve()
    first = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", silent_port))
    second = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", server.port))

    async def two_addresses(*args: object, **kwargs: object) -> list[tuple[object, ...]]:
        return [first, second]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", two_addresses)
    started = time.monotonic()
    response = await wire.send(get(f"http://two-addresses.test:{server.port}/x", timeout=5), LIMIT)
    elapsed = time.monotonic() - started
    assert response.content == b"GET /x"
    assert 0.2 < elapsed < 2.0


# ---------------------------------------------------------------- httpx's client on the wire


async def test_httpx_over_the_wire_shares_its_pool_and_reads_bodies_once(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """What token endpoints go through: httpx's client on Http1Transport. A form POST
    arrives whole; a gzip answer is decoded once (httpx does not decode it again); the
    requests of the step and of the client share one connection."""

    async def token_endpoint(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            if seen.method == "POST":
                body = b'{"access_token": "at-1", "form": "%s"}' % seen.body
                await peer.send(answer(gzip.compress(body), "Content-Encoding: gzip"))
            else:
                await peer.send(answer(echoed(seen)))

    server = await serve(token_endpoint)
    async with httpx.AsyncClient(transport=Http1Transport(wire)) as client:
        token = await client.post(server.url("/token"), data={"grant_type": "client_credentials"})
        assert token.json() == {"access_token": "at-1", "form": "grant_type=client_credentials"}
        assert "content-encoding" not in token.headers
        step = await wire.send(get(server.url("/step")), LIMIT)
        assert step.content == b"GET /step"
    assert server.accepted == 1
    posted = server.seen[0]
    assert posted.header("Content-Type") == ["application/x-www-form-urlencoded"]


async def test_httpx_over_the_wire_raises_httpx_errors(
    serve: ServerFactory, wire: Http1Wire, closed_port: int
) -> None:
    """Failures reach the code above httpx as httpx's own errors, with the wire's reason."""

    async def never_answer(peer: Peer) -> None:
        await peer.until_eof()

    server = await serve(never_answer)
    async with httpx.AsyncClient(transport=Http1Transport(wire)) as client:
        with pytest.raises(httpx.ConnectError, match="Cannot connect to host"):
            await client.get(f"http://127.0.0.1:{closed_port}/")
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url("/hang"), timeout=0.2)
        assert time.monotonic() - started < 1.0
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(server.url("/x"), headers={"X-Note": "a\x00b"})


async def test_a_pool_closed_while_connecting_sends_nothing(
    serve: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose() while a request's connection is still being opened (its name being
    resolved): the request fails, nothing reaches the server, and no connection is left."""
    server = await serve()
    wire = Http1Wire()
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def slow_resolve(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await resolve(*args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", slow_resolve)
    pending = asyncio.create_task(wire.send(get(server.url("/late"), timeout=5), LIMIT))
    await asyncio.sleep(0.1)
    await wire.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(pending, 2.0)
    await asyncio.sleep(0.1)
    assert server.seen == []
    assert wire.open_connections == 0


async def test_a_token_post_the_server_took_but_never_answered_is_not_a_connect_error(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """The token code resends a request only after httpx.ConnectError (nothing was sent):
    a POST the server read and then hung up on must read as a protocol error, or a
    single-use refresh token would be spent twice."""

    async def read_and_hang_up(peer: Peer) -> None:
        await peer.request()

    server = await serve(read_and_hang_up)
    async with httpx.AsyncClient(transport=Http1Transport(wire)) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await client.post(server.url("/token"), data={"refresh_token": "rt-1"})
    assert [seen.body for seen in server.seen] == [b"refresh_token=rt-1"]


async def test_httpx_over_the_wire_takes_any_header_and_times_the_answer(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """A header value that is not ASCII reaches httpx as the server sent it, a gzip body
    followed by a newline (as some servers send) is read, and response.elapsed is set."""

    async def odd_answer(peer: Peer) -> None:
        while await peer.request() is not None:
            body = gzip.compress(b'{"ok": true}') + b"\n"
            disposition = 'Content-Disposition: attachment; filename="café.json"'
            head = answer(body, "Content-Encoding: gzip", disposition.encode().decode("latin-1"))
            await peer.send(head)

    server = await serve(odd_answer)
    async with httpx.AsyncClient(transport=Http1Transport(wire)) as client:
        response = await client.get(server.url("/file"))
    assert response.json() == {"ok": True}
    assert response.headers["content-disposition"] == 'attachment; filename="café.json"'
    assert response.elapsed.total_seconds() >= 0


@pytest.mark.parametrize("cut", ["reset", "pool-closed"])
async def test_a_body_read_until_close_that_is_cut_short_fails(
    serve: ServerFactory, wire: Http1Wire, cut: str
) -> None:
    """A body framed by the end of the connection is complete only when the server ends
    it cleanly: a reset, or the pool closing the connection itself, is not an end."""

    async def half_then_cut(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"items": [1, 2, 3')
        if cut == "reset":
            sock = peer.writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            peer.writer.transport.abort()  # RST, not FIN
        else:
            await asyncio.sleep(5)

    server = await serve(half_then_cut)
    pending = asyncio.create_task(wire.send(get(server.url("/items"), timeout=3), LIMIT))
    if cut == "pool-closed":
        await eventually(lambda: len(server.seen) == 1)
        await asyncio.sleep(0.05)
        await wire.aclose()
    with pytest.raises(WireConnectionError) as failed:
        await asyncio.wait_for(pending, 2.0)
    assert failed.value.kind == "ReadError"


async def test_a_content_length_with_spaces_still_frames_the_body(
    serve: ServerFactory, wire: Http1Wire
) -> None:
    """`Content-Length: 10 ` (a space after it is allowed): the connection is reused, and
    a body cut short of it is an error, not an answer."""

    async def spaced_length(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            if seen.target == "/cut":
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10 \r\n\r\nabcd")
                return
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2 \r\n\r\nok")

    server = await serve(spaced_length)
    for _ in range(3):
        assert (await wire.send(get(server.url("/ok")), LIMIT)).content == b"ok"
    assert server.accepted == 1
    with pytest.raises(WireConnectionError) as failed:
        await wire.send(get(server.url("/cut")), LIMIT)
    assert failed.value.kind == "ReadError"


async def test_a_request_still_connecting_when_the_pool_closes_keeps_its_timeout(
    wire: Http1Wire, silent_port: int
) -> None:
    """aclose() while a connection is being opened to an address that takes none: the
    request ends at its own timeout, not after the system's connect timeout."""
    started = time.monotonic()
    pending = asyncio.create_task(
        wire.send(get(f"http://127.0.0.1:{silent_port}/", timeout=0.5), LIMIT)
    )
    await asyncio.sleep(0.1)
    await wire.aclose()
    with pytest.raises((WireTimeout, RuntimeError)):
        await asyncio.wait_for(pending, 3.0)
    assert time.monotonic() - started < 1.5
