"""The wire of the http step: a small HTTP/1.1 client on asyncio and httptools; and
:class:`Http1Transport`, httpx's client on the same pool (token endpoints, notifications).

Every http step of every run sends its requests here, so the cost of a request is most
of a run's cost. aiohttp's client cost 280 us of CPU a request here, on its own (a GET
with its JSON read, 32 at a time, one core); this client costs 50-65 us for the same
request, because it does only what a step needs: one request per connection at a time,
the body read whole within a limit, no cookies, no redirects (the step follows them, to
keep credentials where they belong), no proxy. The parsing is httptools' (llhttp, the
parser of Node.js), which frames the responses: ``Content-Length``, chunked, or until
the server closes.

What it does:

- keeps connections alive and reuses them, per scheme, host and port, the most recently
  used first; a connection idle for ``KEEPALIVE_SECONDS`` is closed (one timer sweeps
  them all), and keeps nothing of the last answer meanwhile;
- connects with happy eyeballs (aiohappyeyeballs, aiohttp's own): an address that does
  not answer (a broken IPv6 route) is passed over after ``HAPPY_EYEBALLS_DELAY``;
- opens at most ``MAX_CONNECTIONS`` at once; past that, an idle connection to another
  host is closed to make room, or the request waits for one to come free;
- sends a request that a reused connection lost before any byte of its answer (the
  server closed it while idle) once more on a new connection, if its method is
  idempotent, as aiohttp and browsers do;
- decompresses gzip and deflate bodies, with the limit counted on the decompressed bytes
  (bytes after the end of the compressed stream fail the answer, but a next gzip member);
- refuses a response whose headers, or a chunked body's trailers, pass
  ``MAX_RESPONSE_HEAD_BYTES`` (httptools has no such limit of its own); trailers are not
  kept;
- sends a header only if its name is a token and its value holds no control character
  (no header injection from a rendered value); reads header values as UTF-8, or Latin-1
  when they are not;
- does not reuse a connection whose request said ``Connection: close``, or that was
  answered before its request body was all sent;
- bounds the whole exchange by the request's timeout, through one deadline sweep for all
  requests (:mod:`flowrunner.deadlines`); a connection whose exchange was cut short is
  dropped at once (its unsent bytes with it), never reused.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import re
import socket
import ssl
import time
import zlib
from collections import deque
from typing import Any, cast

import aiohappyeyeballs
import httptools
import httpx
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from flowrunner.deadlines import Deadlines
from flowrunner.wire import (
    DEFAULT_TIMEOUT,
    USER_AGENT,
    BodyTooLarge,
    WireConnectionError,
    WireRequest,
    WireResponse,
    WireTimeout,
    default_ssl_context,
)

MAX_CONNECTIONS = 200
# Shorter than the 5 s that uvicorn, Apache and httpcore keep an idle connection: closed
# here first, an idle connection is not reused just as the server closes it.
KEEPALIVE_SECONDS = 4.0
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before the next address is tried alongside
MAX_TRAILING_WHITESPACE = 1024  # after a compressed body, tolerated and dropped
MAX_INFORMATIONAL = 10  # 1xx answers before the real one (100 Continue, 103 Early Hints)
# A request sent again when a reused connection turns out closed: safe only for these.
_RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose request always states its body's length, even when there is none.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Headers the client writes itself, from the request's body.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_CHARSET = re.compile(r";\s*charset\s*=\s*\"?([^\s;\"]+)", re.IGNORECASE)
# A header name is a token (RFC 9110); a value holds no control character but a tab.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_GZIP_MAGIC = b"\x1f\x8b"
_DECODED = frozenset({"gzip", "x-gzip", "deflate"})  # the codings this client decodes


def _no_answer() -> WireConnectionError:
    """The request was written and the server hung up without a byte of answer: it may
    have received the request (not a ConnectError, which says nothing was sent)."""
    return WireConnectionError(
        "RemoteProtocolError", "the server closed the connection without answering"
    )


Key = tuple[str, str, int]


class _Stale(Exception):
    """A reused connection closed before any byte of the answer came."""


class Http1Wire:
    """Step requests over HTTP/1.1 connections kept by this pool (see the module)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = MAX_CONNECTIONS,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
    ) -> None:
        self._ssl = ssl_context
        self.max_connections = max_connections
        self.keepalive_seconds = keepalive_seconds
        self._idle: dict[Key, list[_Connection]] = {}
        self._connections: set[_Connection] = set()  # open (those being opened: _opening)
        self._opening = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._deadlines = Deadlines()
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None  # closes expired idle connections

    @property
    def open_connections(self) -> int:
        return len(self._connections) + self._opening

    async def send(self, request: WireRequest, body_limit: int) -> WireResponse:
        url = request.url
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise WireConnectionError(
                "UnsupportedProtocol", f"cannot send a request to a {url.scheme or 'relative'} URL"
            )
        key: Key = (url.scheme, url.raw_host, url.port or 0)
        head = _request_head(request)
        # A watch of flowrunner.deadlines rather than asyncio.timeout: no timer armed and
        # cancelled per request.
        watch = self._deadlines.start(request.timeout)
        try:
            # A second time, on a new connection, only if the server closed an idle one
            # as it was reused, and the method is safe to send again.
            for fresh in (False, True):
                connection, reused = await self._acquire(key, fresh)
                try:
                    return await connection.exchange(request, head, body_limit)
                except _Stale:
                    if fresh or not reused or request.method not in _RETRYABLE_METHODS:
                        raise _no_answer() from None
            raise AssertionError("unreachable: the second attempt returns or raises")
        except asyncio.CancelledError:
            if watch.timed_out():
                raise WireTimeout(f"no complete answer within {request.timeout:g}s") from None
            raise
        finally:
            watch.close()

    # ------------------------------------------------------------ the pool

    async def _acquire(self, key: Key, fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection to ``key``: an idle one (True), or a new one (False)."""
        while True:
            if self._closed:
                raise RuntimeError("this connection pool is closed")
            # Looked at again after each wait: the connection freed may be to this host.
            idle = self._idle.get(key)
            if idle and not fresh:
                now = time.monotonic()
                while idle:
                    connection = idle.pop()
                    if not idle:
                        del self._idle[key]  # no empty list kept per host ever reached
                    if connection.reusable(now, self.keepalive_seconds):
                        return connection, True
                    connection.close()
            if self.open_connections < self.max_connections:
                return await self._connect(key), False
            if self._close_oldest_idle():
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving: the turn goes to the next
                raise

    async def _connect(self, key: Key) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        secure = scheme == "https"
        created: list[_Connection] = []

        def protocol() -> _Connection:
            created.append(_Connection(self, key))
            return created[-1]

        self._opening += 1  # until connection_made counts it among the open ones
        try:
            addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            # Happy eyeballs (RFC 8305), as aiohttp and browsers do: a host whose IPv6
            # address does not answer is reached over IPv4 a quarter second later.
            sock = await aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
            )
            _, connection = await loop.create_connection(
                protocol,
                sock=sock,
                ssl=(self._ssl or default_ssl_context()) if secure else None,
                # A name written with its final dot ("example.com.") is checked without it.
                server_hostname=host.rstrip(".") if secure else None,
            )
        except ssl.SSLError as exc:
            reason = getattr(exc, "verify_message", None) or exc.reason or exc
            raise WireConnectionError(
                "ConnectError", f"TLS with {host}:{port} failed: {reason}"
            ) from exc
        except OSError as exc:
            if isinstance(exc, socket.gaierror):
                reason = f"the name does not resolve ({exc.strerror})"
            elif exc.errno:
                reason = os.strerror(exc.errno)
            else:
                reason = str(exc) or type(exc).__name__
            raise WireConnectionError(
                "ConnectError", f"Cannot connect to host {host}:{port}: {reason}"
            ) from exc
        except UnicodeError as exc:  # a label too long or empty for IDNA
            raise WireConnectionError("ConnectError", f"invalid host name: {exc}") from exc
        finally:
            if not (created and created[-1].counted):
                self._opening -= 1
                self._wake_one()
        if self._closed:  # closed while this connection was being opened
            connection.close()
            raise RuntimeError("this connection pool is closed")
        return connection

    def _close_oldest_idle(self) -> bool:
        """Close the idle connection unused the longest, to make room; False if none."""
        oldest: _Connection | None = None
        for connections in self._idle.values():
            for connection in connections:
                if oldest is None or connection.idle_since < oldest.idle_since:
                    oldest = connection
        if oldest is None:
            return False
        oldest.close()
        return True

    def _release(self, connection: _Connection) -> None:
        """An exchange is over: keep the connection for the next, or let it go."""
        transport = connection.transport
        if (
            self._closed
            or not connection.keep_alive
            or connection.closed
            or transport is None
            # Answered before its request was all sent (a 401 to a large upload, say):
            # the rest of the body would go out before the next request.
            or transport.get_write_buffer_size()
        ):
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.key, []).append(connection)
        if self._sweep is None:
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(self.keepalive_seconds, self._close_expired)
        self._wake_one()  # a waiter for another host may now close it to make room

    def _close_expired(self) -> None:
        """Close the connections idle for ``keepalive_seconds`` (one timer for all)."""
        self._sweep = None
        now = time.monotonic()
        for connections in list(self._idle.values()):
            for connection in [
                c for c in connections if not c.reusable(now, self.keepalive_seconds)
            ]:
                connection.close()
        if self._idle and not self._closed:
            self._sweep = asyncio.get_running_loop().call_later(
                self.keepalive_seconds / 2, self._close_expired
            )

    def _opened(self, connection: _Connection) -> None:
        connection.counted = True
        self._opening -= 1
        self._connections.add(connection)

    def _lost(self, connection: _Connection) -> None:
        """A connection is closed (by either side): it frees its place."""
        self._connections.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        # The deadlines stay: a request still connecting keeps its timeout (the sweep
        # stops by itself once no request is open).
        for connection in list(self._connections):
            connection.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError("this connection pool is closed"))
        self._waiters.clear()


@functools.lru_cache(maxsize=512)  # the same few names, request after request
def _valid_name(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


def _value_is_clean(value: str) -> bool:
    """No control character but a tab (the slow path: ``isprintable`` says no also to a
    tab and to characters such as a no-break space, which are allowed)."""
    return _CONTROL.search(value) is None


# A header as checked and written: (its lower-cased name, its line), by (name, value).
# Requests send the same few headers again and again. Bounded: values may vary.
_HEADER_LINES: dict[tuple[str, str], tuple[str, str]] = {}
_HEADER_LINES_KEPT = 1024


def _header_line(name: str, value: str) -> tuple[str, str] | None:
    """A header's lower-cased name and line, checked; None for a framing header."""
    lower = name.lower()
    if lower in _FRAMING:
        return None
    if not _valid_name(name) or not (value.isprintable() or _value_is_clean(value)):
        raise WireConnectionError(
            "InvalidHeader",
            f"header {name!r}: a name is letters, digits and !#$%&'*+-.^_`|~, and a "
            "value holds no line break or other control character",
        )
    if len(_HEADER_LINES) >= _HEADER_LINES_KEPT:
        _HEADER_LINES.clear()
    known = _HEADER_LINES[(name, value)] = (lower, f"{name}: {value}")
    return known


def _request_head(request: WireRequest) -> bytes:
    """The request line and headers, as bytes on the wire."""
    url = request.url
    target = url.raw_path_qs or "/"
    lines = [f"{request.method} {target} HTTP/1.1"]
    given: set[str] = set()
    for pair in request.headers.items():
        known = _HEADER_LINES.get(pair)
        if known is None:
            known = _header_line(*pair)
            if known is None:
                continue  # framing: ours to write
        given.add(known[0])
        lines.append(known[1])
    if "host" not in given:
        lines.insert(1, f"Host: {url.host_port_subcomponent}")
    if "user-agent" not in given:
        lines.append(f"User-Agent: {USER_AGENT}")
    if "accept" not in given:
        lines.append("Accept: */*")
    if "accept-encoding" not in given:
        lines.append("Accept-Encoding: gzip, deflate")
    if "authorization" not in given and url.raw_user:
        credentials = f"{url.user or ''}:{url.password or ''}".encode()
        lines.append(f"Authorization: Basic {base64.b64encode(credentials).decode()}")
    if request.content is not None or request.method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(request.content or b'')}")
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise WireConnectionError(
            "InvalidHeader", "a header holds characters HTTP/1.1 cannot carry"
        ) from None


def _head_too_large() -> WireConnectionError:
    return WireConnectionError(
        "RemoteProtocolError",
        f"the answer's headers are larger than {MAX_RESPONSE_HEAD_BYTES} bytes",
    )


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one exchange at a time, parsed by httptools."""

    def __init__(self, pool: Http1Wire, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.keep_alive = False
        self.counted = False  # among the pool's open connections
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self._waiter: asyncio.Future[WireResponse] | None = None
        self._request: WireRequest | None = None
        self._limit = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: bytes | bytearray = b""  # a first piece as it came; more, in a buffer
        self._size = 0
        self._head_bytes = 0  # bytes read while the head was incomplete
        self._header_bytes = 0  # the size of the headers parsed
        self._headers_done = False
        self._answered = False  # a byte of the answer came
        self._until_close = False  # the body ends when the server closes
        self._decoder: Any = None
        self._encoding = ""
        # The first bytes of a "deflate" body, until zlib has checked its header (on two
        # bytes): fed again to a raw decoder if the body has no zlib wrapper.
        self._undecided: bytes | None = None
        self._fed = False  # compressed bytes came
        self._ended = False  # a compressed stream ended, and what followed it was taken
        self._trailing = 0  # whitespace after the compressed stream, dropped
        self._status = 0
        self._informational = 0  # 1xx answers before this one
        self._close_after = False  # the request said Connection: close

    # ------------------------------------------------------------ one exchange

    async def exchange(self, request: WireRequest, head: bytes, limit: int) -> WireResponse:
        transport = self.transport
        if transport is None or self.closed:
            raise _Stale
        self._reset()
        self._request, self._limit = request, limit
        self._close_after = "close" in request.headers.get("Connection", "").lower()
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self.keep_alive = False
        transport.write(head + request.content if request.content else head)
        try:
            response: WireResponse = await waiter
        except BaseException:
            self.close()  # cut short (a timeout, a failure): its state is unknown
            raise
        self.pool._release(self)
        return response

    def reusable(self, now: float, keepalive: float) -> bool:
        transport = self.transport
        return (
            not self.closed
            and transport is not None
            and not transport.is_closing()
            and now - self.idle_since < keepalive
        )

    def close(self) -> None:
        # abort(), not close(): a request cut short may leave a large body unsent, which
        # close() would go on sending (and the socket would outlive the pool's count).
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self._closed()

    def _closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool._lost(self)

    def _fail(self, error: Exception) -> None:
        waiter = self._waiter
        self._waiter = None
        self.keep_alive = False
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.pool._opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done and self._until_close and exc is None and not self.closed:
                self.on_message_complete()  # the body ran until the server closed it
            elif not self._answered:
                self._fail(_Stale())
            else:
                self._fail(
                    WireConnectionError(
                        "ReadError", "the connection closed before the whole answer came"
                    )
                )
        self._closed()

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # nobody asked: not HTTP we can follow; drop the connection
            self.keep_alive = False
            if self.transport is not None:
                self.transport.close()
            return
        self._answered = True
        if not self._headers_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(WireConnectionError("RemoteProtocolError", "the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(WireConnectionError("RemoteProtocolError", f"not a valid answer: {exc}"))
        if (
            not self._headers_done
            and self._waiter is not None
            and self._head_bytes > MAX_RESPONSE_HEAD_BYTES
        ):
            self._fail(_head_too_large())

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self._waiter is None:  # bytes after the answer, unasked for: not reused
            self.keep_alive = False
            if self.transport is not None:
                self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if not self._headers_done:
            self._headers.append((name, value))
        elif self._header_bytes > MAX_RESPONSE_HEAD_BYTES and self._waiter is not None:
            self._fail(_head_too_large())  # trailers of a chunked body: counted, dropped

    def on_headers_complete(self) -> None:
        self._status = status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # informational: the real answer follows
        self._headers_done = True
        if self._header_bytes > MAX_RESPONSE_HEAD_BYTES:  # it came whole, in one read
            self._fail(_head_too_large())
            return
        length: int | None = None
        chunked = False
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"content-length":
                digits = value.strip()
                length = int(digits) if digits.isdigit() else None
            elif lower == b"transfer-encoding":
                # Chunked framing only when chunked is the last coding (as llhttp reads it).
                chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif lower == b"content-encoding":
                self._encoding = value.strip().lower().decode("latin-1")
        if self._encoding in _DECODED:
            self._decoder = zlib.decompressobj(wbits=47)  # gzip or zlib, from the header
            self._undecided = b"" if self._encoding == "deflate" else None
        else:
            self._decoder = None
        request = self._request
        if request is not None and request.method == "HEAD":
            self.keep_alive = False  # llhttp would wait for the body it announces: not reused
            self._complete()
            return
        bodiless = status in (204, 304)  # a length here is the resource's, not a body's
        if length is not None and length > self._limit and self._decoder is None and not bodiless:
            self._fail(BodyTooLarge(self._limit))
            return
        self._until_close = length is None and not chunked and not bodiless

    def on_body(self, body: bytes) -> None:
        if self._waiter is None:
            return
        if self._decoder is not None:
            try:
                body = self._decompress(body)
            except zlib.error as exc:
                self._fail(WireConnectionError("DecodingError", f"cannot decompress: {exc}"))
                return
        self._size += len(body)
        if self._size > self._limit:
            self._fail(BodyTooLarge(self._limit))
            return
        if not self._body:
            self._body = body
        elif isinstance(self._body, bytes):
            # One buffer for the pieces: a list of many small chunks costs far more.
            self._body = bytearray(self._body)
            self._body += body
        else:
            self._body += body

    def _decompress(self, data: bytes) -> bytes:
        """Decode ``data``; past the limit, one byte more than the room left (the caller
        then sees the limit passed, and nothing more is decoded)."""
        self._fed = True
        out = b""
        while True:
            if self._decoder.eof:
                data = self._after_stream_end(data)
                if not data:
                    return out
            room = self._limit - self._size - len(out) + 1
            undecided = self._undecided
            try:
                piece: bytes = self._decoder.decompress(data, room)
            except zlib.error:
                if undecided is None:
                    raise
                # "deflate" sent raw, without its zlib wrapper, as some servers do.
                self._undecided = None
                self._decoder = zlib.decompressobj(wbits=-zlib.MAX_WBITS)
                piece = self._decoder.decompress(undecided + data, room)
            else:
                if undecided is not None:
                    undecided += data
                    self._undecided = undecided if len(undecided) < 2 else None
            out += piece
            if self._decoder.unconsumed_tail:
                return out + b"\0"
            if not (self._decoder.eof and self._decoder.unused_data):
                return out
            data = b""  # the stream ended inside this data: what follows it, next

    def _after_stream_end(self, data: bytes) -> bytes:
        """Bytes after the end of a compressed stream: the next member of a gzip body
        (what ``gzip`` itself writes when appending; returned, to decode), a little
        whitespace (a newline some servers add; dropped), else an error: nothing piles up."""
        rest: bytes = data if self._ended else self._decoder.unused_data + data
        self._ended = True
        if not rest:
            return rest
        if self._encoding != "deflate" and rest.startswith(_GZIP_MAGIC[: len(rest)]):
            self._decoder, self._ended = zlib.decompressobj(wbits=31), False
            return rest
        self._trailing += len(rest)
        if rest.strip() or self._trailing > MAX_TRAILING_WHITESPACE:
            raise zlib.error("bytes after the end of the compressed body")
        return b""

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            self._headers, self._head_bytes, self._header_bytes, self._status = [], 0, 0, 0
            self._informational += 1
            if self._informational > MAX_INFORMATIONAL:
                self._fail(
                    WireConnectionError(
                        "RemoteProtocolError",
                        f"more than {MAX_INFORMATIONAL} informational (1xx) answers in a row",
                    )
                )
            return
        if self._waiter is None or self._waiter.done():
            return
        self.keep_alive = (
            not self._until_close
            and not self._close_after
            and self._parser.should_keep_alive()
            and self.transport is not None
        )
        if self._decoder is not None:
            decoder, self._decoder = self._decoder, None
            tail = decoder.flush()
            if self._fed and not decoder.eof:
                self._fail(
                    WireConnectionError("DecodingError", "the compressed body stops before its end")
                )
                return
            if tail:
                self.on_body(tail)
                if self._waiter is None:
                    return
        self._complete()

    def _complete(self) -> None:
        waiter, request = self._waiter, self._request
        self._waiter = None
        if waiter is None or waiter.done() or request is None:
            return
        headers: CIMultiDict[str] = CIMultiDict(
            [
                (name.decode("latin-1"), value.decode() if value.isascii() else _header_text(value))
                for name, value in self._headers
            ]
        )
        content_type = headers.get("Content-Type", "")
        found = _CHARSET.search(content_type) if "charset" in content_type.lower() else None
        body = self._body if isinstance(self._body, bytes) else bytes(self._body)
        # What the answer was read into goes now: an idle connection keeps none of it.
        self._body, self._headers, self._request = b"", [], None
        waiter.set_result(
            WireResponse(
                self._status,
                CIMultiDictProxy(headers),
                body,
                found.group(1) if found else None,
                request.url,
                request,
            )
        )


def _header_text(value: bytes) -> str:
    """A header value as text: UTF-8 when it is (as servers send non-ASCII values today),
    else Latin-1 (what HTTP/1.1 once said), never an error."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


# ---------------------------------------------------------------- httpx's client on it

# A failed exchange as httpx names it: what the code above httpx's client catches.
_HTTPX_ERRORS: dict[str, type[httpx.RequestError]] = {
    "ConnectError": httpx.ConnectError,
    "ReadError": httpx.ReadError,
    "RemoteProtocolError": httpx.RemoteProtocolError,
    "DecodingError": httpx.DecodingError,
    "InvalidHeader": httpx.LocalProtocolError,
    "UnsupportedProtocol": httpx.UnsupportedProtocol,
}


class Http1Transport(httpx.AsyncBaseTransport):
    """httpx's client over an :class:`Http1Wire`: token endpoints and notifications keep
    httpx's API (its auth flows, MockTransport in tests) and share the http step's pool.

    The answer is read whole, within ``body_limit``, and handed to httpx decoded: its
    ``Content-Encoding`` (and the length of the encoded body) are taken off, or httpx
    would decode it a second time. httpx's timeouts: the largest of them bounds the
    whole exchange (this project gives one value to all four), and its expiry is a
    ReadTimeout."""

    def __init__(self, wire: Http1Wire, body_limit: int = 10 * 1024 * 1024) -> None:
        self.wire = wire
        self.body_limit = body_limit

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()
        limits = request.extensions.get("timeout") or {}
        given = [seconds for seconds in limits.values() if seconds is not None]
        timeout = max(given) if given else DEFAULT_TIMEOUT
        outgoing = WireRequest(
            request.method,
            URL(str(request.url), encoded=True),
            CIMultiDict(request.headers.multi_items()),
            content or None,
            timeout,
        )
        try:
            response = await self.wire.send(outgoing, self.body_limit)
        except WireTimeout as exc:
            raise httpx.ReadTimeout(str(exc), request=request) from exc
        except BodyTooLarge as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        except WireConnectionError as exc:
            error = _HTTPX_ERRORS.get(exc.kind, httpx.TransportError)
            raise error(exc.message, request=request) from exc
        headers = response.headers
        decoded = headers.get("Content-Encoding", "").strip().lower() in _DECODED
        dropped = ("content-encoding", "content-length") if decoded else ()
        # As bytes: httpx would encode text values as ASCII, and fail on any other.
        pairs = [
            (name.encode("latin-1"), value.encode("utf-8"))
            for name, value in headers.items()
            if name.lower() not in dropped
        ]
        return httpx.Response(
            response.status_code,
            headers=pairs,
            # A stream, which httpx's client reads itself (and times: response.elapsed).
            stream=httpx.ByteStream(response.content),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        """The wire belongs to whoever built it (the runtime closes it)."""
