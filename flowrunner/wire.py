"""The wire under the ``http`` step: a request, a response, and the two ways to send them.

Step requests are the hot path of a run, so they do not go through httpx's client: a
:class:`WireRequest` is a plain record (a ``yarl.URL``, parsed once; headers in a
case-insensitive ``CIMultiDict``), and :class:`flowrunner.http1.Http1Wire` sends it over
a connection pool of its own. :class:`HttpxWire` sends the same requests through an
``httpx.AsyncClient`` instead; it is used when a transport is given to ``build_runtime``
(tests inject ``httpx.MockTransport`` that way). Both raise the same errors, and both
read the body with a size limit before the response is handed back.

Auth profiles apply their credentials through :class:`WireAuth`: its ``exchange``
completes the request, sends it, and may send it once more (after refreshing a token,
say). An auth can instead be written as an async generator flow (``auth_flow``) that
yields the request to send and receives its response; the default ``exchange`` drives
it. :func:`send_with_auth` sends a request with either.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import logging
import re
import ssl
from collections.abc import AsyncGenerator, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote_plus, urlencode

import httpx
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from flowrunner import __version__
from flowrunner.secrets import MaskingFilter

USER_AGENT = f"flowrunner/{__version__}"
DEFAULT_TIMEOUT = 30.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# The httpx client still serves token endpoints and notifications, and httpx logs each
# request's URL at INFO: mask it like everything else a run writes.
logging.getLogger("httpx").addFilter(MaskingFilter())


# ---------------------------------------------------------------- requests and responses


@dataclass(slots=True)
class WireRequest:
    """One HTTP request as the step built it (and as its auth flow completed it)."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    content: bytes | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds for the whole exchange, body included


@dataclass(slots=True)
class WireResponse:
    """A response whose body has been read (within the sender's size limit)."""

    status_code: int
    headers: CIMultiDictProxy[str]
    content: bytes
    charset: str | None
    url: URL
    request: WireRequest
    _dict: dict[str, str] | None = field(default=None, repr=False)

    @property
    def encoding(self) -> str:
        """The body's declared charset when Python knows it, else UTF-8."""
        return known_encoding(self.charset) or "utf-8"

    @property
    def text(self) -> str:
        return self.content.decode(self.encoding, errors="replace")

    @property
    def location(self) -> str | None:
        """Where a redirect points, when it is one."""
        if self.status_code in REDIRECT_STATUSES:
            return self.headers.get("Location")
        return None

    def header_dict(self) -> dict[str, str]:
        """The headers as a dict with lower-cased names; a header that came several times
        holds its values joined with ", " (what a step's result and the history show)."""
        if self._dict is None:
            headers: dict[str, str] = {}
            for name, value in self.headers.items():
                key = name.lower()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            self._dict = headers
        return self._dict


@functools.lru_cache(maxsize=32)
def known_encoding(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


# ---------------------------------------------------------------- errors


class WireError(Exception):
    """The exchange failed before a whole response was read."""


class WireTimeout(WireError):
    """The exchange took longer than the request's timeout."""


class WireConnectionError(WireError):
    """No usable answer: the connection was refused or reset, the name did not resolve,
    the server hung up or spoke something other than HTTP. ``kind`` names the failure
    as the step's error shows it (``ConnectError``, ``ReadError``...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class BodyTooLarge(WireError):
    """The response body is larger than the limit; reading stopped there."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the response body is larger than {limit} bytes")
        self.limit = limit


# ---------------------------------------------------------------- URLs


# A URL that is percent-encoded already: only characters a URL may hold, and escapes.
_ENCODED_URL = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")


# A step sends to the same few URLs run after run: a URL is parsed once, and the same
# (immutable) object reused keeps what yarl works out of it (host, path) once too.
@functools.lru_cache(maxsize=1024)
def parse_url(text: str) -> URL:
    """``text`` as a URL (raises ValueError if it is not one). The query of a URL that is
    percent-encoded already is kept as written: yarl would re-encode it, turning ``%2F``
    into ``/``, which breaks a signed URL. Anything else (spaces, non-ASCII text) is
    encoded, and the path normalised, by yarl."""
    url = URL(text)
    if "?" in text and _ENCODED_URL.fullmatch(text):
        written = text.split("#", 1)[0].split("?", 1)[1]
        if written != url.raw_query_string:
            url = _with_query_string(url, written)
    return url


@functools.lru_cache(maxsize=1024)
def url_text(url: URL) -> str:
    """``str(url)``, which yarl works out again on every call (a microsecond)."""
    return str(url)


def merge_query(url: URL, params: Mapping[str, str | list[str]]) -> URL:
    """``url`` with ``params`` added to its own query string; a name already there takes
    the new value(s) in its place. The URL's own parameters stay as they were written;
    the new ones are encoded as a form would be (``quote_plus``), so that a secret in a
    parameter reads in the URL as the run's masker expects."""
    if not params:
        return url
    given = {
        name: urlencode([(name, v) for v in (values if isinstance(values, list) else [values])])
        for name, values in params.items()
    }
    pairs: list[str] = []
    for pair in url.raw_query_string.split("&") if url.raw_query_string else []:
        name = unquote_plus(pair.split("=", 1)[0])
        if name not in params:
            pairs.append(pair)
        elif name in given and (values := given.pop(name)):
            pairs.append(values)  # the first time the name comes: the new values, in its place
    pairs.extend(value for value in given.values() if value)
    return _with_query_string(url, "&".join(pairs))


def without_query(url: URL, names: Iterable[str]) -> URL:
    """``url`` without the query parameters ``names``."""
    drop = set(names)
    if not drop:
        return url
    return with_query_items(url, ((k, v) for k, v in url.query.items() if k not in drop))


def with_query_items(url: URL, items: Iterable[tuple[str, str]]) -> URL:
    return _with_query_string(url, urlencode(list(items)))


def _with_query_string(url: URL, query_string: str) -> URL:
    return URL.build(
        scheme=url.scheme,
        authority=url.raw_authority,
        path=url.raw_path,
        query_string=query_string,
        fragment=url.raw_fragment,
        encoded=True,
    )


def _default_port(url: URL) -> int | None:
    return url.port if url.port is not None else {"http": 80, "https": 443}.get(url.scheme)


def redirect_request(response: WireResponse) -> WireRequest | None:
    """The request a redirect answer asks for, or None if it is not one. As browsers (and
    httpx) do: 303, and 302 or a POST's 301, become a GET without a body; the
    Authorization header does not leave the origin (except for an upgrade to HTTPS on the
    same host); a Cookie header is never carried over."""
    location = response.location
    if location is None:
        return None
    request = response.request
    try:
        url = parse_url(location)
    except ValueError:
        raise WireConnectionError(
            "RemoteProtocolError", f"invalid URL in the Location header: {location!r}"
        ) from None
    if not url.is_absolute():
        url = request.url.join(url)
    if url.scheme not in ("http", "https") or not url.host:
        raise WireConnectionError(
            "UnsupportedProtocol", f"a redirect to {str(url)!r} cannot be followed"
        )
    if request.url.fragment and not url.fragment:
        url = url.with_fragment(request.url.fragment)
    status, method = response.status_code, request.method
    if (status in (302, 303) and method != "HEAD") or (status == 301 and method == "POST"):
        method = "GET"
    headers = request.headers.copy()
    old = request.url
    if (url.scheme, url.host, _default_port(url)) != (old.scheme, old.host, _default_port(old)):
        upgrade = (
            old.scheme == "http"
            and _default_port(old) == 80
            and url.scheme == "https"
            and _default_port(url) == 443
            and old.host == url.host
        )
        if not upgrade:
            headers.popall("Authorization", None)
        headers.popall("Host", None)
    content = request.content
    if method != request.method and method == "GET":
        headers.popall("Content-Length", None)
        headers.popall("Transfer-Encoding", None)
        content = None
    headers.popall("Cookie", None)
    return WireRequest(method, url, headers, content, request.timeout)


# ---------------------------------------------------------------- auth flows


class WireAuth:
    """Applies a credential to a request, in one of two ways a subclass chooses.

    ``exchange`` is a coroutine that completes the request, sends it through the wire
    and returns the response; it may send once more (after a refresh), and may raise to
    fail the step with a message a human can act on. The auth profiles' own auths
    override it: it is the path of every request, and a plain coroutine costs a fraction
    of an async generator's protocol.

    ``auth_flow`` is the same written as an async generator: it yields the request to
    send and receives its response, and may yield again to resend. The default
    ``exchange`` drives it."""

    __slots__ = ()

    def auth_flow(self, request: WireRequest) -> AsyncGenerator[WireRequest, WireResponse]:
        raise NotImplementedError

    async def exchange(self, wire: Wire, request: WireRequest, body_limit: int) -> WireResponse:
        """Send ``request`` with the credential applied, as ``auth_flow`` says."""
        flow = self.auth_flow(request)
        try:
            request = await flow.__anext__()
            while True:
                response = await wire.send(request, body_limit)
                try:
                    request = await flow.asend(response)
                except StopAsyncIteration:  # the flow is done (and closed)
                    return response
        except BaseException:
            await flow.aclose()  # a flow stopped half-way runs its cleanup now
            raise


def send_with_auth(
    wire: Wire, request: WireRequest, auth: WireAuth | None, body_limit: int
) -> Coroutine[Any, Any, WireResponse]:
    """Send ``request`` with the credential ``auth`` applies (if any). Returns the
    coroutine to await for the response: the sender's or the auth's own, not one more
    around it."""
    if auth is None:
        return wire.send(request, body_limit)
    return auth.exchange(wire, request, body_limit)


# ---------------------------------------------------------------- senders


class Wire(Protocol):
    async def send(self, request: WireRequest, body_limit: int) -> WireResponse:
        """Send one request (no redirect followed) and read its body, at most
        ``body_limit`` bytes of it (BodyTooLarge past that)."""
        ...

    async def aclose(self) -> None: ...


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The certificates httpx trusts (certifi's bundle, or SSL_CERT_FILE / SSL_CERT_DIR),
    loaded once per process for every connection pool."""
    return httpx.create_ssl_context()


class HttpxWire:
    """Step requests through an ``httpx.AsyncClient`` (one built on an injected
    transport), with the same errors and the same bounded body read as Http1Wire."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def send(self, request: WireRequest, body_limit: int) -> WireResponse:
        outgoing = self.client.build_request(
            request.method,
            str(request.url),
            headers=list(request.headers.items()),
            content=request.content,
            timeout=request.timeout,
        )
        try:
            async with asyncio.timeout(request.timeout):
                response = await self.client.send(outgoing, stream=True, follow_redirects=False)
                try:
                    content = await _read_httpx(response, body_limit)
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise WireTimeout(str(exc)) from exc
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.TimeoutException):
                raise WireTimeout(str(exc)) from exc
            raise WireConnectionError(type(exc).__name__, str(exc)) from exc
        headers = CIMultiDictProxy(CIMultiDict(response.headers.multi_items()))
        return WireResponse(
            response.status_code,
            headers,
            content,
            response.charset_encoding,
            URL(str(response.url)),
            request,
        )

    async def aclose(self) -> None:
        """Nothing to close: the client belongs to whoever built it."""


async def _read_httpx(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
