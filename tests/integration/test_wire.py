"""The wire under the http step (flowrunner.wire, flowrunner.http1) driven directly,
against a real server on 127.0.0.1, and what the step builds on it (headers, queries,
redirects)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from multidict import CIMultiDict
from upstream_server import Upstream
from yarl import URL

from flowrunner import __version__
from flowrunner.app import Runtime, build_runtime
from flowrunner.http1 import Http1Transport, Http1Wire
from flowrunner.loader import load_project
from flowrunner.store.runs import RunRecord
from flowrunner.wire import (
    BodyTooLarge,
    WireConnectionError,
    WireRequest,
    WireTimeout,
    merge_query,
)

ProjectWriter = Callable[..., Path]
RuntimeFactory = Callable[..., Runtime]
CONSUMER_KEY = "ck_5f0e8a7d1c"
CONSUMER_SECRET = "cs_9b2d/4e+61"  # characters a query string encodes


@pytest.fixture
async def wire() -> AsyncIterator[Http1Wire]:
    opened = Http1Wire()
    yield opened
    await opened.aclose()


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> WireRequest:
    return WireRequest("GET", URL(url), CIMultiDict(headers or {}), None, timeout)


async def run_flow(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    flow: str,
    profiles: dict[str, str] | None = None,
    **tokens: str,
) -> tuple[RunRecord, Runtime]:
    runtime = open_runtime(write_project({"f": flow}, profiles, **tokens))
    return await runtime.engine.run("f"), runtime


SHOP = {
    "shop": """
    name: shop
    kind: api_key
    base_url: @BASE@
    query: {consumer_key: "${{ secrets.SHOP_KEY }}", consumer_secret: "${{ secrets.SHOP_SECRET }}"}
    allowed_hosts: [127.0.0.1]
    """
}


@pytest.fixture
def shop_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_KEY", CONSUMER_KEY)
    monkeypatch.setenv("SHOP_SECRET", CONSUMER_SECRET)


# ---------------------------------------------------------------- the wire itself


async def test_the_body_is_read_up_to_the_limit_with_or_without_content_length(
    wire: Http1Wire, upstream: Upstream
) -> None:
    """A body with a Content-Length is read whole when it fits and refused unread when it
    does not; a streamed one (no Content-Length) is read until it passes the limit. The
    pool goes on serving requests afterwards."""
    base = upstream.base_url
    fits = await wire.send(get(f"{base}/bytes?n=1000"), 1000)
    assert (fits.status_code, len(fits.content)) == (200, 1000)
    assert fits.headers["content-length"] == "1000"
    with pytest.raises(BodyTooLarge):
        await wire.send(get(f"{base}/bytes?n=1001"), 1000)
    streamed = await wire.send(get(f"{base}/huge?kb=64"), 65536)
    assert "content-length" not in streamed.headers
    assert streamed.content == b"x" * 65536
    with pytest.raises(BodyTooLarge):
        await wire.send(get(f"{base}/huge?kb=1024"), 100_000)
    after = await wire.send(get(f"{base}/echo"), 1000)
    assert after.status_code == 200


async def test_a_gzip_body_is_decompressed_and_limited_by_its_decompressed_size(
    wire: Http1Wire, upstream: Upstream
) -> None:
    """gzip is decoded; the limit counts the decoded bytes, so a small compressed body that
    expands past it is refused."""
    base = upstream.base_url
    response = await wire.send(get(f"{base}/bytes?n=50000&gzip=1"), 60_000)
    assert response.headers["content-encoding"] == "gzip"
    assert response.content == b"y" * 50000
    with pytest.raises(BodyTooLarge):
        await wire.send(get(f"{base}/bytes?n=50000&gzip=1"), 10_000)


async def test_a_refused_connection_and_a_slow_answer_are_told_apart(
    wire: Http1Wire, upstream: Upstream, closed_port: int
) -> None:
    with pytest.raises(WireConnectionError) as refused:
        await wire.send(get(f"http://127.0.0.1:{closed_port}/"), 1000)
    assert refused.value.kind == "ConnectError"
    assert str(closed_port) in refused.value.message
    started = time.monotonic()
    with pytest.raises(WireTimeout):
        await wire.send(get(f"{upstream.base_url}/slow?delay=2", timeout=0.2), 1000)
    assert time.monotonic() - started < 1.5


async def test_the_timeout_covers_a_body_that_stalls_after_its_headers(
    wire: Http1Wire, upstream: Upstream
) -> None:
    """The request's timeout bounds the whole exchange, not only the wait for headers: a
    body whose chunks stop coming fails as a timeout, and the pool serves the next one."""
    started = time.monotonic()
    with pytest.raises(WireTimeout):
        await wire.send(get(f"{upstream.base_url}/huge?kb=192&pause=1", timeout=0.5), 10**6)
    assert time.monotonic() - started < 1.5
    after = await wire.send(get(f"{upstream.base_url}/huge?kb=64", timeout=2), 10**6)
    assert len(after.content) == 65536


async def serve_raw(answer: bytes) -> tuple[asyncio.Server, int]:
    """A server that reads a request, writes ``answer`` and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"", "RemoteProtocolError"),  # hung up without answering the request it read
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", "ReadError"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "RemoteProtocolError"),
    ],
)
async def test_a_server_that_hangs_up_or_speaks_no_http(
    wire: Http1Wire, answer: bytes, kind: str
) -> None:
    server, port = await serve_raw(answer)
    async with server:
        with pytest.raises(WireConnectionError) as failed:
            await wire.send(get(f"http://127.0.0.1:{port}/"), 1000)
    assert failed.value.kind == kind


async def test_the_user_agent_is_flowrunners_unless_the_request_sets_one(
    wire: Http1Wire, upstream: Upstream
) -> None:
    default = await wire.send(get(f"{upstream.base_url}/echo"), 100_000)
    own = await wire.send(get(f"{upstream.base_url}/echo", {"user-agent": "mine/2"}), 100_000)
    assert default.headers["content-type"] == "application/json"
    assert json.loads(default.content)["headers"]["user-agent"] == f"flowrunner/{__version__}"
    assert json.loads(own.text)["headers"]["user-agent"] == "mine/2"


def test_a_runtime_built_before_the_loop_opens_its_pool_inside_it(
    write_project: ProjectWriter, upstream: Upstream
) -> None:
    """The CLI builds some runtimes before any event loop runs; the connection pool opens
    its connections inside the loop that runs the first request, and closes them in it."""
    root = write_project({"f": 'name: f\nsteps:\n  - id: get\n    http: {url: "@BASE@/echo"}\n'})
    runtime = build_runtime(root, project=load_project(root), keep_history=False)

    async def run_and_close() -> RunRecord:
        try:
            return await runtime.engine.run("f")
        finally:
            await runtime.aclose()

    record = asyncio.run(run_and_close())
    assert record.status == "succeeded", record.error


@pytest.mark.parametrize("through", ["wire", "httpx"])
async def test_both_wires_fail_a_step_alike(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    closed_port: int,
    through: str,
) -> None:
    """A refused connection and a slow answer read the same through the wire itself and
    through httpx's client on it (Http1Transport: what token endpoints go through)."""
    root = write_project(
        {
            "down": "name: down\nsteps:\n  - id: get\n    retry: {attempts: 1}\n"
            f'    http: {{url: "http://127.0.0.1:{closed_port}/x"}}\n',
            "slow": "name: slow\nsteps:\n  - id: get\n    retry: {attempts: 1}\n"
            '    http: {url: "@BASE@/slow?delay=2", timeout: 200ms}\n',
        }
    )
    pool = Http1Wire()
    transport = Http1Transport(pool) if through == "httpx" else None
    runtime = open_runtime(root, transport=transport)
    try:
        down = await runtime.engine.run("down")
        slow = await runtime.engine.run("slow")
    finally:
        await pool.aclose()
    assert down.error is not None and down.error.startswith(
        f"step get: GET http://127.0.0.1:{closed_port}/x: connection failed: ConnectError: "
        f"Cannot connect to host 127.0.0.1:{closed_port}"
    )
    assert slow.error is not None and slow.error.endswith("/slow?delay=2: timed out after 0.2s")


# ---------------------------------------------------------------- what the step builds on it


async def test_result_headers_have_lower_case_names_and_joined_repeats(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """`steps.<id>.headers` names are lower case and a header sent twice reads "a, b"; the
    history keeps the same without Set-Cookie."""
    record, _ = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: h
            http: {url: "@BASE@/headers"}
        outputs:
          headers: ${{ steps.h.headers }}
        """,
    )
    assert record.status == "succeeded", record.error
    headers = record.outputs["headers"]
    assert headers["x-repeated"] == "one, two"
    assert headers["x-mixed-case"] == "Value"
    assert headers["set-cookie"] == "session=abc; Path=/"
    assert all(name == name.lower() for name in headers)
    stored = record.steps[0].response
    assert stored is not None
    assert stored["headers"]["x-repeated"] == "one, two"
    assert "set-cookie" not in stored["headers"]


async def test_query_and_query_credentials_merge_into_the_urls_own_query(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    shop_secrets: None,
) -> None:
    """A step's `query` and an API key profile's query parameters are added to the query
    the URL already has (a name given again takes the new value, in its place); the history
    shows the URL with the credentials masked."""
    key = upstream.key()
    record, _ = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: list
            http:
              url: /echo?page=2&key=@KEY@
              auth: shop
              query: {page: 3, per_page: 10}
        """,
        SHOP,
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    (seen,) = upstream.state.requests(key)
    assert parse_qs(urlsplit(seen["url"]).query) == {
        "page": ["3"],
        "key": [key],
        "per_page": ["10"],
        "consumer_key": [CONSUMER_KEY],
        "consumer_secret": [CONSUMER_SECRET],
    }
    stored = record.steps[0].request
    assert stored is not None
    assert stored["url"] == (
        f"{upstream.base_url}/echo?page=3&key={key}&per_page=10"
        "&consumer_key=***&consumer_secret=***"
    )


async def test_a_cross_host_redirect_drops_a_query_string_credential(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    shop_secrets: None,
) -> None:
    """A redirect that repeats the query string (credentials included) to a host outside
    allowed_hosts is followed without them; a redirect on an allowed host keeps them."""
    key = upstream.key()
    record, _ = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: away
            http: {url: "/moved?key=@KEY@-away&page=2", auth: shop}
          - id: home
            http: {url: "/bounce?key=@KEY@-bounce&to=/echo%3Fkey%3D@KEY@-home", auth: shop}
        """,
        SHOP,
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    (first,) = upstream.state.requests(f"{key}-away")
    (landed,) = upstream.state.requests(f"{key}-away:landing")
    assert CONSUMER_KEY in first["url"]
    assert urlsplit(landed["url"]).netloc == f"localhost:{upstream.port}"
    assert parse_qs(urlsplit(landed["url"]).query) == {"key": [f"{key}-away"], "page": ["2"]}
    (home,) = upstream.state.requests(f"{key}-home")
    assert parse_qs(urlsplit(home["url"]).query)["consumer_key"] == [CONSUMER_KEY]
    stored = record.steps[0].request
    assert stored is not None and stored["url"].startswith(f"http://localhost:{upstream.port}/")


async def test_redirects_follow_the_browsers_rules(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """303 turns a POST into a GET without its body, 307 keeps both; an Authorization
    header the flow wrote does not follow a redirect to another origin; a redirect loop
    fails the step."""
    key = upstream.key()
    port = upstream.port
    record, _ = await run_flow(
        write_project,
        open_runtime,
        f"""
        name: f
        steps:
          - id: see_other
            http:
              method: POST
              url: "@BASE@/bounce?status=303&to=/echo%3Fkey%3D@KEY@-303"
              json: {{a: 1}}
          - id: temporary
            http:
              method: POST
              url: "@BASE@/bounce?status=307&to=/echo%3Fkey%3D@KEY@-307"
              json: {{a: 1}}
          - id: elsewhere
            http:
              url: "@BASE@/bounce?to=http://localhost:{port}/echo%3Fkey%3D@KEY@-away"
              headers: {{Authorization: Bearer written-by-hand}}
          - id: loop
            on_error: continue
            http: {{url: "@BASE@/bounce"}}
        outputs:
          see_other: ${{{{ steps.see_other.body.method }}}} ${{{{ steps.see_other.body.body }}}}
          temporary: ${{{{ steps.temporary.body.method }}}} ${{{{ steps.temporary.body.body }}}}
          error: ${{{{ steps.loop.error }}}}
        """,
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    assert record.outputs is not None
    assert record.outputs["see_other"] == "GET "
    assert record.outputs["temporary"] == 'POST {"a":1}'
    assert record.outputs["error"].endswith("/bounce: more than 20 redirects")
    (away,) = upstream.state.requests(f"{key}-away")
    assert "authorization" not in away["headers"]


def test_merge_query_encodes_as_a_form_and_keeps_the_rest_of_the_url() -> None:
    url = URL("http://user@h.example:8080/a%20b/c?x=1&y=2&x=3#frag")
    merged = merge_query(url, {"x": "é & /", "z": ["1", "2"]})
    assert str(merged) == "http://user@h.example:8080/a%20b/c?x=%C3%A9+%26+%2F&y=2&z=1&z=2#frag"
    assert merge_query(url, {}) is url
