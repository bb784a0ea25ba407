"""Webhook intake at /hooks/<path>: refusals, signatures, answers, bodies and dedupe.

The server runs in-process (``serving.ServerPool``: ``Server.start()``, requests through
``httpx.ASGITransport``), with a real upstream server (``conftest.upstream``) for the
flows' http steps. One test drives a real uvicorn server
in a thread, for what only real HTTP has (chunked request bodies).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from serving import BASE, Served, ServeFactory, ServerPool
from upstream_server import Upstream

from flowrunner.server import MAX_REQUEST_HEAD_BYTES, BoundedHttpToolsProtocol, build_server

ProjectWriter = Callable[..., Path]
HOOK_SECRET = "whsec-0123456789abcdef"
HOOK_TOKEN = "hook-token-5f2c9d"


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    """Start servers on project directories; all are stopped at teardown."""
    async with ServerPool() as pool:

        async def start(root: Path, **kwargs: Any) -> Served:
            served = await pool.start(root, **kwargs)
            assert served.server.problems == [], [p.format() for p in served.server.problems]
            return served

        yield start


@pytest.fixture(autouse=True)
def hook_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", HOOK_SECRET)
    monkeypatch.setenv("HOOK_TOKEN", HOOK_TOKEN)
    monkeypatch.setenv("HOOK_USER", "zapier")
    monkeypatch.setenv("HOOK_PASSWORD", "pa55-w0rd-long")


def assert_nothing_stored(served: Served) -> None:
    """No run, no intake row, no dedupe key."""
    assert served.runs() == []
    assert served.table("runs") == []
    assert served.table("run_queue") == []
    assert served.table("dedupe_keys") == []
    assert served.server.dispatcher.queue.depth() == 0


def sign(body: bytes, secret: str = HOOK_SECRET, *, encoding: str = "hex") -> str:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


# ---------------------------------------------------------------- refusals

GUARDED_FLOWS = {
    "signed": """
        name: signed
        triggers:
          - webhook:
              path: signed
              auth: {hmac: {secret: "${{ secrets.HOOK_SECRET }}", header: X-Signature}}
        steps:
          - id: note
            set: {n: "${{ trigger.body.n }}"}
    """,
    "github": """
        name: github
        triggers:
          - webhook:
              path: github
              auth:
                hmac:
                  secret: "${{ secrets.HOOK_SECRET }}"
                  header: X-Hub-Signature-256
                  prefix: "sha256="
                  encoding: base64
        steps:
          - id: note
            set: {n: "${{ trigger.body.n }}"}
    """,
    "stamped": """
        name: stamped
        triggers:
          - webhook:
              path: stamped
              auth:
                hmac:
                  secret: "${{ secrets.HOOK_SECRET }}"
                  timestamp_header: X-Timestamp
                  tolerance: 5m
        steps:
          - id: note
            set: {n: "${{ trigger.body.n }}"}
    """,
    "bearer": """
        name: bearer
        triggers:
          - webhook: {path: bearer, auth: {bearer: {token: "${{ secrets.HOOK_TOKEN }}"}}}
        steps:
          - id: note
            set: {n: "${{ trigger.body.n }}"}
    """,
    "basic": """
        name: basic
        triggers:
          - webhook:
              path: basic
              auth:
                basic:
                  username: "${{ secrets.HOOK_USER }}"
                  password: "${{ secrets.HOOK_PASSWORD }}"
        steps:
          - id: note
            set: {n: "${{ trigger.body.n }}"}
    """,
    "as-user": """
        name: as-user
        triggers:
          - webhook: {path: as-user, auth: {connected_user: true}}
        steps:
          - id: note
            set: {n: "${{ trigger.body.n }}"}
    """,
    "as-user-once": """
        name: as-user-once
        concurrency: {limit: 1, when_busy: skip}
        triggers:
          - webhook: {path: as-user-once, auth: {connected_user: true}}
        steps:
          - id: note
            set: {who: "${{ trigger.user }}"}
    """,
    "small": """
        name: small
        triggers:
          - webhook: {path: small, auth: none, methods: [POST, PUT], max_body: 64}
        steps:
          - id: note
            set: {body: "${{ trigger.body }}"}
    """,
}

Request = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
JSON_BODY = b'{"n": 1}'
JSON_TYPE = {"content-type": "application/json"}


def _post(path: str, body: bytes = JSON_BODY, **headers: str) -> Request:
    def send(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return client.post(f"/hooks/{path}", content=body, headers={**JSON_TYPE, **headers})

    return send


def _chunked(path: str, size: int) -> Request:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(size // 16):
            yield b"x" * 16

    def send(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return client.post(f"/hooks/{path}", content=chunks(), headers=JSON_TYPE)

    return send


STALE = str(int(time.time()) - 3600)
REFUSALS: dict[str, tuple[Request, int, str]] = {
    "wrong hmac signature": (
        _post("signed", **{"X-Signature": sign(JSON_BODY, "another-secret")}),
        401,
        "does not match",
    ),
    "hmac of another body": (
        _post("signed", b'{"n": 2}', **{"X-Signature": sign(JSON_BODY)}),
        401,
        "does not match",
    ),
    "missing signature": (_post("signed"), 401, "X-Signature signature header is missing"),
    "missing prefix": (
        _post("github", **{"X-Hub-Signature-256": sign(JSON_BODY, encoding="base64")}),
        401,
        "must start with 'sha256='",
    ),
    "hex where base64 is expected": (
        _post("github", **{"X-Hub-Signature-256": "sha256=" + sign(JSON_BODY)}),
        401,
        "does not match",
    ),
    "stale timestamp": (
        _post(
            "stamped",
            **{"X-Timestamp": STALE, "X-Signature": sign(STALE.encode() + b"." + JSON_BODY)},
        ),
        401,
        "outside the tolerance window",
    ),
    "missing timestamp": (
        _post("stamped", **{"X-Signature": sign(JSON_BODY)}),
        401,
        "X-Timestamp timestamp is missing",
    ),
    "wrong bearer token": (
        _post("bearer", Authorization="Bearer not-the-token"),
        401,
        "bearer token",
    ),
    "no bearer token": (_post("bearer"), 401, "bearer token"),
    "wrong basic password": (
        _post("basic", Authorization="Basic " + base64.b64encode(b"zapier:wrong").decode()),
        401,
        "basic credentials",
    ),
    "connected user without Authorization": (
        _post("as-user"),
        401,
        "send the user's token in the Authorization header",
    ),
    "body over max_body (Content-Length)": (
        _post("small", b'{"pad": "' + b"x" * 80 + b'"}'),
        413,
        "larger than 64 bytes",
    ),
    "body over max_body (chunked)": (_chunked("small", 160), 413, "larger than 64 bytes"),
    "invalid JSON": (_post("small", b'{"n": '), 400, "not valid JSON"),
    "unknown path": (_post("nowhere"), 404, "no webhook at /hooks/nowhere"),
    "wrong method": (
        lambda client: client.get("/hooks/small"),
        405,
        "accepts POST, PUT",
    ),
}


async def test_each_refusal_is_a_4xx_with_a_reason_and_creates_no_run(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """Every refused webhook gets its 4xx with a reason and leaves nothing in the state store."""
    served = await serve(make_project(GUARDED_FLOWS))
    for case, (send, status, reason) in REFUSALS.items():
        response = await send(served.client)
        assert response.status_code == status, (case, response.text)
        assert reason in response.json()["error"], case
        await asyncio.sleep(0.02)  # a dispatcher pass, had anything been queued
        assert_nothing_stored(served)


def _signed_requests() -> dict[str, Request]:
    stamp = str(int(time.time()))
    return {
        "hex": _post("signed", **{"X-Signature": sign(JSON_BODY)}),
        "hex, upper case": _post("signed", **{"X-Signature": sign(JSON_BODY).upper()}),
        "base64 with a prefix": _post(
            "github", **{"X-Hub-Signature-256": "sha256=" + sign(JSON_BODY, encoding="base64")}
        ),
        "timestamped": _post(
            "stamped",
            **{"X-Timestamp": stamp, "X-Signature": sign(stamp.encode() + b"." + JSON_BODY)},
        ),
        "bearer": _post("bearer", Authorization=f"Bearer {HOOK_TOKEN}"),
        "basic": _post(
            "basic",
            Authorization="Basic " + base64.b64encode(b"zapier:pa55-w0rd-long").decode(),
        ),
        "connected user": _post("as-user", Authorization="Bearer user-token-of-ada"),
    }


async def test_a_correct_credential_is_accepted_and_runs(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """A correct HMAC (hex in either case, base64 with a prefix, timestamped), bearer, basic
    or user token is accepted with 202, and its run succeeds with the body it sent."""
    served = await serve(make_project(GUARDED_FLOWS))
    requests = _signed_requests()
    for case, send in requests.items():
        response = await send(served.client)
        assert response.status_code == 202, (case, response.text)
        record = await served.finished(response.json()["run_id"])
        assert record.status == "succeeded", (case, record.error)
        assert record.trigger["body"] == {"n": 1}, case
    assert len(served.runs()) == len(requests)


async def test_credentials_from_the_request_are_kept_out_of_the_state_store(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """The Authorization header of an accepted webhook is encrypted in the intake row while it
    waits, reaches the run, and is masked in the stored run."""
    served = await serve(make_project(GUARDED_FLOWS), paused=True)
    response = await _post("as-user", Authorization="Bearer user-token-of-ada")(served.client)
    token_marker = "user-token-of-ada"
    assert len(served.table("run_queue")) == 1
    assert token_marker not in repr(served.table("run_queue"))
    queued = served.server.dispatcher.queue.queued()
    assert queued[0].trigger["headers"]["authorization"] == f"Bearer {token_marker}"
    served.resume()
    record = await served.finished(response.json()["run_id"])
    assert record.status == "succeeded", record.error
    assert record.trigger["headers"]["authorization"] == "***"
    assert token_marker not in repr(served.table("runs"))


async def test_a_connected_user_webhook_names_its_caller(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """A webhook that acts as the calling user names that user (from the token's claims)
    as ``trigger.user`` and ``run.user``, in the history and at the status URL; another
    webhook's trigger has no user. The token itself is stored nowhere."""
    served = await serve(make_project(GUARDED_FLOWS))
    claims = base64.urlsafe_b64encode(b'{"sub":"u-1","email":"ada@acme.example"}').decode()
    token = f"eyJhbGciOiJIUzI1NiJ9.{claims.rstrip('=')}.c2lnbmF0dXJl"
    response = await _post("as-user", Authorization=f"Bearer {token}")(served.client)
    assert response.status_code == 202, response.text
    record = await served.finished(response.json()["run_id"])
    assert record.status == "succeeded", record.error
    assert record.user == "ada@acme.example"
    assert record.trigger["user"] == "ada@acme.example"
    status = await served.client.get(response.json()["status_url"])
    assert status.json()["user"] == "ada@acme.example"
    assert token not in repr(served.table("runs"))

    response = await _post("bearer", Authorization=f"Bearer {HOOK_TOKEN}")(served.client)
    record = await served.finished(response.json()["run_id"])
    assert record.user is None
    assert record.trigger["user"] is None

    # A run refused at intake (its flow is busy) names its caller too.
    served.pause()
    first = await _post("as-user-once", Authorization=f"Bearer {token}")(served.client)
    assert first.status_code == 202, first.text
    second = await _post("as-user-once", Authorization=f"Bearer {token}")(served.client)
    assert second.json()["status"] == "skipped", second.text
    assert served.run(second.json()["run_id"]).user == "ada@acme.example"


# ---------------------------------------------------------------- real HTTP


@pytest.fixture
def real_http(make_project: Callable[..., Path]) -> Iterator[str]:
    """The guarded project behind a real uvicorn server in a thread; yields its base URL."""
    server = build_server(make_project(GUARDED_FLOWS))
    config = uvicorn.Config(
        server.asgi(),
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        http=BoundedHttpToolsProtocol,  # what `flowrunner serve` runs
    )
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, name="flowrunner-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not web.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = web.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        web.should_exit = True
        thread.join(timeout=10)


def test_body_limits_hold_over_real_http(real_http: str) -> None:
    """Over real HTTP, a body over max_body is refused with 413 whether it declares its
    length or arrives chunked, and the connection stays usable for the next request."""
    oversized = b'{"pad": "' + b"x" * 200 + b'"}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(oversized), 32):
            yield oversized[start : start + 32]

    with httpx.Client(base_url=real_http, timeout=10) as client:
        declared = client.post("/hooks/small", content=oversized, headers=JSON_TYPE)
        chunked = client.post("/hooks/small", content=chunks(), headers=JSON_TYPE)
        fits = client.post("/hooks/small", json={"n": 1})
        health = client.get("/healthz")
    assert declared.status_code == 413
    assert "content-length" in {k.lower() for k in declared.request.headers}
    assert chunked.status_code == 413
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert fits.status_code == 202
    assert health.json()["status"] == "ok"


def _exchange_raw(base_url: str, pieces: list[bytes], pause: float = 0) -> bytes:
    """Send ``pieces`` on one connection (``pause`` seconds apart), then read the answer
    until the server closes or 5 s pass."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(pause)
        except OSError:
            pass  # the server may close before everything is sent
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith((b"KiB", b"}")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _hook_request(extra_header: bytes = b"", body: bytes = JSON_BODY) -> bytes:
    return (
        b"POST /hooks/bearer HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {HOOK_TOKEN}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + extra_header
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def test_request_headers_are_bounded_over_real_http(real_http: str, tmp_path: Path) -> None:
    """Headers of more than 16 KiB are refused with 431 (and create no run), whether they
    come at once or a little at a time without their end; headers under the limit, or a
    body larger than the limit, are accepted; the server goes on serving."""
    too_large = b"X-Pad: " + b"a" * (MAX_REQUEST_HEAD_BYTES + 100) + b"\r\n"
    fits = b"X-Pad: " + b"a" * (MAX_REQUEST_HEAD_BYTES - 2_000) + b"\r\n"
    refused = _exchange_raw(real_http, [_hook_request(too_large)])
    assert refused.startswith(b"HTTP/1.1 431 "), refused[:80]
    trickle = [b"POST /hooks/bearer HTTP/1.1\r\nHost: x\r\n"]
    trickle += [b"X-Pad-%d: %s\r\n" % (i, b"b" * 1000) for i in range(20)]
    refused_slowly = _exchange_raw(real_http, trickle, pause=0.005)
    assert refused_slowly.startswith(b"HTTP/1.1 431 "), refused_slowly[:80]
    accepted = _exchange_raw(real_http, [_hook_request(fits)])
    assert accepted.startswith(b"HTTP/1.1 202 "), accepted[:80]
    big_body = b'{"n": 2, "pad": "' + b"c" * (4 * MAX_REQUEST_HEAD_BYTES) + b'"}'
    with_body = _exchange_raw(real_http, [_hook_request(body=big_body)])
    assert with_body.startswith(b"HTTP/1.1 202 "), with_body[:80]
    with httpx.Client(base_url=real_http, timeout=10) as client:
        assert client.get("/healthz").json()["status"] == "ok"
    # Two runs, for the two accepted requests: the refused ones created none.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with sqlite3.connect(tmp_path / ".flowrunner" / "state.db") as conn:
            runs = conn.execute("SELECT status FROM runs").fetchall()
            queued = conn.execute("SELECT count(*) FROM run_queue").fetchone()[0]
        if len(runs) >= 2 and not queued:
            break
        time.sleep(0.05)
    assert runs == [("succeeded",), ("succeeded",)]


def test_a_caller_leaving_mid_body_creates_no_run_and_no_error(
    real_http: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that declares a body and leaves before sending it all gets no run, and the
    server logs why at level info instead of an application error; it goes on serving."""
    caplog.set_level(logging.INFO)
    host, port = real_http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(_hook_request()[:-4].replace(b"Content-Length: 8", b"Content-Length: 800"))
    with httpx.Client(base_url=real_http, timeout=10) as client:
        deadline = time.monotonic() + 5
        while "left before sending its body" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text[-2000:]
            time.sleep(0.02)
        assert client.get("/healthz").json()["status"] == "ok"
    assert "Exception in ASGI application" not in caplog.text
    with sqlite3.connect(tmp_path / ".flowrunner" / "state.db") as conn:
        assert conn.execute("SELECT count(*) FROM run_queue").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


# ---------------------------------------------------------------- answers

ANSWER_FLOWS = {
    "later": """
        name: later
        triggers:
          - webhook: {path: later, auth: none, respond: immediate}
        steps:
          - id: slow
            http: {url: "@BASE@/slow?delay=0.3&key=@KEY@"}
    """,
    "order": """
        name: order
        triggers:
          - webhook: {path: order, auth: none, respond: wait}
        steps:
          - id: create
            http:
              method: POST
              url: "@BASE@/create?key=@KEY@"
              json: {sku: "${{ trigger.body.sku }}"}
            outputs:
              id: $.id
          - id: reply
            respond:
              status: 201
              headers: {X-Order: "${{ steps.create.outputs.id }}", Location: "/orders/42"}
              json: {order: "${{ steps.create.outputs.id }}", sku: "${{ trigger.body.sku }}"}
    """,
    "text-reply": """
        name: text-reply
        triggers:
          - webhook: {path: text-reply, auth: none, respond: wait}
        steps:
          - id: reply
            respond: {status: 200, body: "hello ${{ trigger.query.who }}"}
    """,
    "summary": """
        name: summary
        triggers:
          - webhook: {path: summary, auth: none, respond: wait}
        outputs:
          doubled: "${{ trigger.body.n * 2 }}"
        steps:
          - id: noop
            set: {n: "${{ trigger.body.n }}"}
    """,
    "broken": """
        name: broken
        triggers:
          - webhook: {path: broken, auth: none, respond: wait}
        steps:
          - id: stop
            fail: "no stock for ${{ trigger.body.sku }}"
    """,
    "patient": """
        name: patient
        triggers:
          - webhook: {path: patient, auth: none, respond: wait, timeout: 300ms}
        steps:
          - id: slow
            http: {url: "@BASE@/slow?delay=1.5&key=@KEY@"}
          - id: reply
            respond: {status: 200, json: {done: true}}
    """,
    "hasty": """
        name: hasty
        triggers:
          - webhook: {path: hasty, auth: none, respond: wait, timeout: 10ms}
        steps:
          - id: slow
            http: {url: "@BASE@/slow?delay=0.5&key=@KEY@"}
    """,
    "mirror": """
        name: mirror
        triggers:
          - webhook: {path: mirror/in, auth: none, respond: wait, methods: [POST, PUT]}
        outputs:
          body: "${{ trigger.body }}"
          query: "${{ trigger.query }}"
          source: "${{ trigger.headers['x-source'] }}"
          method: "${{ trigger.method }}"
          path: "${{ trigger.path }}"
        steps:
          - id: noop
            set: {ok: true}
    """,
}


@pytest.fixture
def answers_project(write_project: ProjectWriter, upstream: Upstream) -> tuple[Path, str]:
    key = upstream.key()
    return write_project(ANSWER_FLOWS, KEY=key), key


async def test_immediate_answers_202_and_the_status_url_follows_the_run(
    answers_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """respond: immediate answers 202 with the run id and a status URL, which reads queued,
    then running, then succeeded."""
    served = await serve(answers_project[0], paused=True)
    response = await served.client.post("/hooks/later", json={"n": 1})
    assert response.status_code == 202
    answer = response.json()
    assert answer["status"] == "queued"
    assert answer["status_url"] == f"{BASE}/runs/{answer['run_id']}"
    status_path = answer["status_url"].removeprefix(BASE)
    assert (await served.client.get(status_path)).json() == {
        "run_id": answer["run_id"],
        "status": "queued",
    }
    served.resume()
    seen = ["queued"]
    deadline = time.monotonic() + 10
    while seen[-1] != "succeeded" and time.monotonic() < deadline:
        status = (await served.client.get(status_path)).json()["status"]
        if status != seen[-1]:
            seen.append(status)
        await asyncio.sleep(0.02)
    assert seen == ["queued", "running", "succeeded"]
    final = (await served.client.get(status_path)).json()
    assert final["flow"] == "later" and final["finished_at"] is not None
    assert (await served.client.get("/runs/not-a-run")).status_code == 404


async def test_wait_answers_with_the_respond_step(
    answers_project: tuple[Path, str], serve: ServeFactory, upstream: Upstream
) -> None:
    """respond: wait answers with the respond step's status, headers and JSON body."""
    root, key = answers_project
    served = await serve(root)
    response = await served.client.post("/hooks/order", json={"sku": "A-1"})
    assert response.status_code == 201
    assert response.headers["x-order"] == "42"
    assert response.headers["location"] == "/orders/42"
    assert response.json() == {"order": 42, "sku": "A-1"}
    assert upstream.state.count(key) == 1
    text = await served.client.post("/hooks/text-reply?who=ada", content=b"")
    assert (text.status_code, text.text) == (200, "hello ada")


async def test_wait_without_a_respond_step_answers_a_summary(
    answers_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """Without a respond step, wait answers 200 with the outputs of a succeeded run and 500
    with the error of a failed one."""
    served = await serve(answers_project[0])
    ok = await served.client.post("/hooks/summary", json={"n": 21})
    assert ok.status_code == 200
    assert ok.json()["status"] == "succeeded"
    assert ok.json()["outputs"] == {"doubled": 42}
    assert served.run(ok.json()["run_id"]).outputs == {"doubled": 42}
    failed = await served.client.post("/hooks/broken", json={"sku": "B-7"})
    assert failed.status_code == 500
    assert failed.json()["status"] == "failed"
    assert failed.json()["error"] == "no stock for B-7"


async def test_the_status_url_is_built_from_how_the_caller_reached_the_server(
    answers_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """Behind a proxy the Host differs per caller: each answer's status URL names the host
    its request named, however many came before."""
    served = await serve(answers_project[0], paused=True)
    for host in ("flows.example.test", "other.example.test:8443", "flows.example.test"):
        answer = (
            await served.client.post("/hooks/later", json={"n": 1}, headers={"Host": host})
        ).json()
        assert answer["status_url"] == f"http://{host}/runs/{answer['run_id']}"


async def test_behind_a_root_path_webhooks_and_their_status_urls_carry_it(
    answers_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """Served under a root path (a proxy's prefix, uvicorn's --root-path): /hooks/ is found
    below it, the status URL keeps the prefix, and reads the run; a path outside the
    prefix that only looks like a webhook's is not one."""
    served = await serve(answers_project[0], paused=True)
    transport = httpx.ASGITransport(app=served.server.asgi(), root_path="/flowrunner")
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        response = await client.post("/flowrunner/hooks/later", json={"n": 1})
        assert response.status_code == 202, response.text
        answer = response.json()
        assert answer["status_url"] == f"{BASE}/flowrunner/runs/{answer['run_id']}"
        status = await client.get(answer["status_url"].removeprefix(BASE))
        assert status.json() == {"run_id": answer["run_id"], "status": "queued"}
        # "/flowrunnerx/hooks/later" is not below the root path "/flowrunner".
        outside = await client.post("/flowrunnerx/hooks/later", json={"n": 1})
        assert outside.status_code == 404
        assert served.server.dispatcher.queue.depth() == 1


async def test_wait_past_the_timeout_answers_202_with_the_status_url(
    answers_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """A run that outlasts the webhook's timeout gets 202 and a status URL; the run goes on
    and succeeds."""
    served = await serve(answers_project[0])
    started = time.monotonic()
    response = await served.client.post("/hooks/patient", json={})
    assert 0.25 < time.monotonic() - started < 1.4  # the timeout, not the run (1.5 s)
    assert response.status_code == 202
    answer = response.json()
    assert answer["status"] == "running"
    assert answer["status_url"].endswith(f"/runs/{answer['run_id']}")
    record = await served.finished(answer["run_id"])
    assert record.status == "succeeded"
    assert record.response == {"status": 200, "headers": {}, "json": {"done": True}}


@pytest.mark.parametrize(
    ("content", "headers", "body"),
    [
        (b'{"items": [1, 2], "who": "Zo\xc3\xa9"}', JSON_TYPE, {"items": [1, 2], "who": "Zoé"}),
        (
            b"name=Ada+Lovelace&tags=&city=Paris",
            {"content-type": "application/x-www-form-urlencoded"},
            {"name": "Ada Lovelace", "tags": "", "city": "Paris"},
        ),
        (b"raw <xml/> words", {"content-type": "text/plain"}, "raw <xml/> words"),
        (b"no content type", {}, "no content type"),
        (b"", JSON_TYPE, None),
    ],
    ids=["json", "form", "text", "untyped", "empty"],
)
async def test_bodies_headers_and_query_reach_the_trigger(
    content: bytes,
    headers: dict[str, str],
    body: Any,
    answers_project: tuple[Path, str],
    serve: ServeFactory,
) -> None:
    """JSON, form and raw bodies reach trigger.body parsed by their content type; headers,
    query, method and path reach the trigger too."""
    served = await serve(answers_project[0])
    response = await served.client.put(
        "/hooks/mirror/in?page=2&q=a%20b",
        content=content,
        headers={**headers, "X-Source": "crm"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == {
        "body": body,
        "query": {"page": "2", "q": "a b"},
        "source": "crm",
        "method": "PUT",
        "path": "mirror/in",
    }


# ---------------------------------------------------------------- dedupe

DEDUPE_FLOWS = {
    "ping": """
        name: ping
        triggers:
          - webhook:
              path: ping
              auth: none
              dedupe: {key: "${{ trigger.headers['x-delivery-id'] }}", for: 1h}
        steps:
          - id: call
            http: {url: "@BASE@/echo?key=@KEY@"}
    """,
    "ask": """
        name: ask
        triggers:
          - webhook:
              path: ask
              auth: none
              respond: wait
              dedupe: {key: "${{ trigger.body.event }}", for: 1h}
        steps:
          - id: call
            http: {url: "@BASE@/echo?key=@KEY@"}
          - id: reply
            respond: {status: 200, json: {run: "${{ run.id }}", n: "${{ trigger.body.n }}"}}
    """,
    "brief": """
        name: brief
        triggers:
          - webhook:
              path: brief
              auth: none
              dedupe: {key: "${{ trigger.body.event }}", for: 300ms}
        steps:
          - id: call
            http: {url: "@BASE@/echo?key=@KEY@"}
    """,
}


@pytest.fixture
def dedupe_project(write_project: ProjectWriter, upstream: Upstream) -> tuple[Path, str]:
    key = upstream.key()
    return write_project(DEDUPE_FLOWS, KEY=key), key


async def test_a_duplicate_gets_the_first_runs_id(
    dedupe_project: tuple[Path, str], serve: ServeFactory, upstream: Upstream
) -> None:
    """The same dedupe key twice within the window: the second answer carries the first
    run's id, and only one run exists."""
    root, key = dedupe_project
    served = await serve(root)
    first = await served.client.post("/hooks/ping", json={}, headers={"X-Delivery-Id": "d-1"})
    second = await served.client.post("/hooks/ping", json={}, headers={"X-Delivery-Id": "d-1"})
    other = await served.client.post("/hooks/ping", json={}, headers={"X-Delivery-Id": "d-2"})
    assert first.status_code == second.status_code == other.status_code == 202
    assert second.json()["run_id"] == first.json()["run_id"]
    assert second.json()["duplicate"] is True
    assert other.json()["run_id"] != first.json()["run_id"]
    await served.finished(first.json()["run_id"])
    await served.finished(other.json()["run_id"])
    assert sorted(r.id for r in served.runs()) == sorted(
        [first.json()["run_id"], other.json()["run_id"]]
    )
    assert upstream.state.count(key) == 2


async def test_a_duplicate_in_wait_mode_gets_the_first_runs_answer(
    dedupe_project: tuple[Path, str], serve: ServeFactory, upstream: Upstream
) -> None:
    """In wait mode a duplicate, sent while the first runs or after it finished, gets the
    first run's answer, and the flow ran once."""
    root, key = dedupe_project
    served = await serve(root)
    together = await asyncio.gather(
        served.client.post("/hooks/ask", json={"event": "e-1", "n": 1}),
        served.client.post("/hooks/ask", json={"event": "e-1", "n": 2}),
    )
    later = await served.client.post("/hooks/ask", json={"event": "e-1", "n": 3})
    answers = [r.json() for r in (*together, later)]
    assert all(r.status_code == 200 for r in (*together, later))
    assert answers[0] == answers[1] == answers[2]
    assert len(served.runs()) == 1
    assert answers[0]["run"] == served.runs()[0].id
    assert upstream.state.count(key) == 1


async def test_after_the_window_the_same_key_runs_again(
    dedupe_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """Once a dedupe key's window has passed, the same key starts a new run."""
    served = await serve(dedupe_project[0])
    first = await served.client.post("/hooks/brief", json={"event": "e-9"})
    again = await served.client.post("/hooks/brief", json={"event": "e-9"})
    assert again.json()["run_id"] == first.json()["run_id"]
    await asyncio.sleep(0.4)
    later = await served.client.post("/hooks/brief", json={"event": "e-9"})
    assert later.status_code == 202
    assert later.json()["run_id"] != first.json()["run_id"]
    assert "duplicate" not in later.json()
    await served.finished(later.json()["run_id"])
    await served.finished(first.json()["run_id"])
    assert len(served.runs()) == 2


# ---------------------------------------------------------------- durable intake


async def test_an_accepted_webhook_is_committed_before_its_answer(
    answers_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """When the 202 arrives, the intake row is already committed (another connection sees
    it) while the dispatcher has started nothing; then it runs."""
    served = await serve(answers_project[0], paused=True)
    response = await served.client.post("/hooks/later", json={"marker": "m-1"})
    assert response.status_code == 202
    run_id = response.json()["run_id"]
    with sqlite3.connect(served.root / ".flowrunner" / "state.db") as conn:
        rows = list(conn.execute("SELECT id, flow, status, trigger FROM run_queue"))
    assert len(rows) == 1
    assert rows[0][:3] == (run_id, "later", "queued")
    assert json.loads(rows[0][3])["body"] == {"marker": "m-1"}
    assert served.table("runs") == []
    served.resume()
    assert (await served.finished(run_id)).status == "succeeded"
    assert served.table("run_queue") == []


async def test_a_waited_run_that_ends_at_once_is_one_write(
    answers_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """respond: wait, a run that ends within moments: its caller is answered once its
    history is committed, and that commit is the webhook's only write (no intake row
    written, then removed)."""
    served = await serve(answers_project[0])
    writes = served.server.runtime.database.writes
    await served.client.post("/hooks/summary", json={"n": 1})  # the writer is started
    await asyncio.sleep(0.1)  # the dispatcher has seen the queue empty: runs start at once
    commits, written = writes.commits, writes.written
    response = await served.client.post("/hooks/summary", json={"n": 2})
    assert response.status_code == 200
    assert (writes.commits - commits, writes.written - written) == (1, 1)
    assert served.run(response.json()["run_id"]).outputs == {"doubled": 4}
    assert served.table("run_queue") == []


async def test_a_waited_run_past_its_timeout_is_stored_before_the_202(
    answers_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """The webhook's timeout (10 ms) comes before the run is written on its own: the 202
    waits for its intake row, which another connection then sees, claimed; the run goes
    on and its end removes the row."""
    served = await serve(answers_project[0])
    await asyncio.sleep(0.1)  # the dispatcher has seen the queue empty: runs start at once
    response = await served.client.post("/hooks/hasty", json={})
    assert response.status_code == 202
    run_id = response.json()["run_id"]
    assert [(row[0], row[5]) for row in served.table("run_queue")] == [(run_id, "running")]
    assert (await served.finished(run_id)).status == "succeeded"
    await asyncio.sleep(0.05)  # the removal rides with the next commit
    assert served.table("run_queue") == []


async def test_a_waited_run_that_cannot_be_stored_gets_no_202(
    answers_project: tuple[Path, str], serve: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The intake row of a run past its webhook's timeout cannot be written (the database
    refuses it): the caller is told 503, not that its run was accepted."""
    served = await serve(answers_project[0])
    with sqlite3.connect(served.root / ".flowrunner" / "state.db") as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON run_queue "
            "BEGIN SELECT RAISE(ABORT, 'the disk says no'); END"
        )
    await asyncio.sleep(0.1)  # the dispatcher has seen the queue empty: runs start at once
    with caplog.at_level(logging.ERROR, logger="flowrunner"):
        response = await served.client.post("/hooks/hasty", json={})
    assert response.status_code == 503
    assert response.json() == {"error": "the run could not be stored; try again"}
    assert "could not be stored" in caplog.text


async def test_the_status_of_a_run_not_stored_yet_reads_running(
    answers_project: tuple[Path, str], serve: ServeFactory
) -> None:
    """A waited-for run is in flight before its intake row is written: its status URL
    already answers `running`, not 404."""
    served = await serve(answers_project[0])
    await asyncio.sleep(0.1)  # the dispatcher has seen the queue empty: runs start at once
    submitted = await served.server.dispatcher.submit("hasty", {"kind": "test"}, caller_waits=True)
    assert served.table("run_queue") == []  # not written yet
    status = await served.client.get(f"/runs/{submitted.run_id}")
    assert (status.status_code, status.json()["status"]) == (200, "running")
    assert (await served.finished(submitted.run_id)).status == "succeeded"
