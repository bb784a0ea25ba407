"""Servers and helpers shared by the auth integration tests (``test_auth_*.py``).

It holds no tests. It gives: a uvicorn server for any ASGI app on 127.0.0.1, port 0, in
a background thread (``serve``); the flowrunner sandbox behind it with a movable clock
(``start_sandbox``); a purpose-built OAuth2 token server and API whose every answer a
test can script (``TokenServer``); project writers; runtimes with an injected clock; and
a child-process runner for the tests that need two processes or a SIGKILL.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from flowrunner.app import Runtime, build_runtime, database_url, token_store
from flowrunner.auth import jwt
from flowrunner.loader import load_project
from flowrunner.profile_status import ProfileState, profile_states
from flowrunner.sandbox import SandboxSettings, create_app
from flowrunner.sandbox.state import SandboxState
from flowrunner.store.database import STATE_DIR, Database
from flowrunner.store.runs import RunRecord
from flowrunner.store.tokens import Credential

START_TIMEOUT = 10.0
CHILD_TIMEOUT = 30.0
MISSING = object()  # TokenServer.expires_in: leave the field out of the answer

# The sandbox's public demo credentials, under names no real environment sets.
SANDBOX_SECRETS = {
    "FRT_ERMEO_CLIENT_ID": "ermeo-demo-client",
    "FRT_ERMEO_CLIENT_SECRET": "ermeo-demo-secret",
    "FRT_ERMEO_USERNAME": "svc-flowrunner@acme.example",
    "FRT_ERMEO_PASSWORD": "demo-password",
    "FRT_TRIPLETEX_CONSUMER": "tripletex-demo-consumer",
    "FRT_TRIPLETEX_EMPLOYEE": "tripletex-demo-employee",
    "FRT_SO_CLIENT_ID": "superoffice-demo-client",
    "FRT_SO_CLIENT_SECRET": "superoffice-demo-secret",
    "FRT_SO_REFRESH": "superoffice-demo-refresh",
    "FRT_WEBCRM_APP_TOKEN": "webcrm-demo-apptoken",
}
# What the purpose-built token server expects.
TS_SECRETS = {
    "FRT_TS_CLIENT_ID": "ts-client-id",
    "FRT_TS_CLIENT_SECRET": "ts-client-secret-d41c",
    "FRT_TS_USERNAME": "robot@acme.example",
    "FRT_TS_PASSWORD": "ts-password-9f2e",
}


# ---------------------------------------------------------------- serving an app


class ServerThread:
    """uvicorn serving one ASGI app on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="auth-test-server", daemon=True)
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError("the test server did not start")
            time.sleep(0.005)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=START_TIMEOUT)


@contextmanager
def serve(app: Any) -> Iterator[ServerThread]:
    server = ServerThread(app)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- the sandbox


@dataclass
class ServerClock:
    """The sandbox's clock: real time plus an offset a test can move."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Sandbox:
    base_url: str
    port: int
    state: SandboxState
    clock: ServerClock

    def reset(self) -> None:
        self.state.reset()
        self.state.settings = SandboxSettings()
        self.clock.offset = 0.0

    def requests(self, route: str) -> int:
        """How many requests the sandbox saw on a route, e.g. 'POST /ermeo/oauth/v2/token'."""
        return self.state.requests[route]

    @property
    def reuses(self) -> int:
        return self.state.refresh_token_reuses


@contextmanager
def start_sandbox() -> Iterator[Sandbox]:
    clock = ServerClock()
    app = create_app(SandboxSettings(), clock=clock)
    with serve(app) as server:
        yield Sandbox(server.base_url, server.port, app.state.sandbox, clock)


ERMEO_TOKEN = "POST /ermeo/oauth/v2/token"
ERMEO_ASSETS = "GET /ermeo/api/v1/assets"


def ermeo_profile(base: str, name: str = "ermeo", extra: str = "") -> str:
    return f"""
        name: {name}
        kind: oauth2
        grant: password
        base_url: {base}/ermeo/api/v1
        token_url: {base}/ermeo/oauth/v2/token
        body_format: json
        client_id: ${{{{ secrets.FRT_ERMEO_CLIENT_ID }}}}
        client_secret: ${{{{ secrets.FRT_ERMEO_CLIENT_SECRET }}}}
        username: ${{{{ secrets.FRT_ERMEO_USERNAME }}}}
        password: ${{{{ secrets.FRT_ERMEO_PASSWORD }}}}
        refresh_token_lifetime: 14d
        owner: it-admins@acme.example
        {textwrap.indent(textwrap.dedent(extra), " " * 8).strip()}
        """


def get_flow(name: str, profile: str, url: str, steps: int = 1) -> str:
    """A flow of ``steps`` GET requests through ``profile``."""
    body = "".join(
        f"""
          - id: call{n}
            http:
              url: {url}
              auth: {profile}
        """
        for n in range(steps)
    )
    return f"name: {name}\nsteps:{textwrap.dedent(body)}"


def write_env(root: Path, values: dict[str, str]) -> None:
    lines = [f"{name}={value}" for name, value in values.items()]
    (root / ".env").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- runtimes


@dataclass
class ClientClock:
    """flowrunner's clock in a test: real time plus an offset."""

    offset: timedelta = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def open_runtime(root: Path, clock: Callable[[], datetime] | None = None) -> Runtime:
    project = load_project(root)
    assert project.problems == [], [p.format() for p in project.problems]
    # The production wire (flowrunner.http1): its TLS context is loaded once per process.
    return build_runtime(root, project=project, clock=clock)


@asynccontextmanager
async def runtime_for(
    root: Path, clock: Callable[[], datetime] | None = None
) -> AsyncIterator[Runtime]:
    runtime = open_runtime(root, clock)
    try:
        yield runtime
    finally:
        await runtime.aclose()


async def run_once(
    root: Path,
    flow: str,
    clock: Callable[[], datetime] | None = None,
    user_token: str | None = None,
) -> RunRecord:
    """One run in a runtime of its own, as a separate invocation would do."""
    async with runtime_for(root, clock) as runtime:
        return await runtime.engine.run(flow, trigger={}, user_token=user_token)


def load_credential(root: Path, profile: str) -> Credential | None:
    """What the state database holds for a profile, read as another process would."""
    project = load_project(root)
    database = Database.open(database_url(project))
    try:
        return token_store(project, database).load(profile)
    finally:
        database.close()


def save_credential(root: Path, credential: Credential) -> None:
    project = load_project(root)
    database = Database.open(database_url(project))
    try:
        token_store(project, database).save(credential)
    finally:
        database.close()


async def profile_state(
    root: Path, profile: str, clock: Callable[[], datetime] | None = None
) -> ProfileState:
    """The profile's line of ``flowrunner profiles``, from a fresh runtime."""
    async with runtime_for(root, clock) as runtime:
        now = (clock or ClientClock())()
        return next(s for s in profile_states(runtime.auth, now) if s.name == profile)


def state_bytes(root: Path) -> bytes:
    """Every byte of the state database, its WAL included."""
    return b"".join(p.read_bytes() for p in sorted((root / STATE_DIR).glob("state.db*")))


# ---------------------------------------------------------------- tokens


def make_jwt(claims: dict[str, Any]) -> str:
    """A JWT-shaped token with these claims (the signature is never checked by the runner)."""

    def segment(value: dict[str, Any]) -> str:
        raw = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signature = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
    return f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment(claims)}.{signature}"


# ---------------------------------------------------------------- a scriptable token server


@dataclass
class TokenCall:
    """One request the token endpoint received, as it arrived."""

    content_type: str
    fields: dict[str, Any]
    authorization: str | None

    @property
    def grant_type(self) -> Any:
        return self.fields.get("grant_type")


@dataclass
class Reply:
    """A scripted answer; ``body=None`` with status 200 means: issue tokens as usual."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class TokenServer:
    """An OAuth2 token endpoint and a protected API, with single-use refresh tokens.

    Routes: ``POST /oauth/token``; ``GET /api/data`` (200 for a live access token, else
    401); ``GET /api/redirect?to=URL`` (302); ``GET /echo`` (what it received).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.base_url = ""
        self.reset()

    def reset(self) -> None:
        """Forget everything: a fresh server for the next test."""
        self.calls: list[TokenCall] = []
        self.api_calls: list[dict[str, str]] = []
        self.api_statuses: list[int] = []
        self.echoes: list[dict[str, Any]] = []
        self.replies: deque[Reply] = deque()
        self.expires_in: Any = 3600
        self.expires_at: Any = MISSING  # a fixed value to send as expires_at
        self.expires_at_after: float | None = None  # send expires_at = now + this
        self.rotate = True  # answer refreshes (and logins) with a new refresh token
        self.extra: dict[str, Any] = {}
        self.delay = 0.0
        self.clock_offset = 0.0
        self.access: dict[str, float] = {}
        self.refresh: dict[str, bool] = {}  # refresh token -> used
        self.reuses = 0
        self.issued: list[dict[str, Any]] = []
        self._serial = itertools.count(1)

    def now(self) -> float:
        return time.time() + self.clock_offset

    def script(self, *replies: Reply) -> None:
        with self.lock:
            self.replies.extend(replies)

    def grants(self) -> list[Any]:
        return [call.grant_type for call in self.calls]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/oauth/token", self._token, methods=["POST"]),
                Route("/api/data", self._data, methods=["GET", "POST"]),
                Route("/api/orders", self._orders, methods=["POST"]),
                Route("/api/redirect", self._redirect, methods=["GET"]),
                Route("/echo", self._echo, methods=["GET", "POST"]),
            ]
        )

    def issue(self, rotate: bool | None = None) -> dict[str, Any]:
        serial = next(self._serial)
        access = f"at-{serial}-{secrets.token_hex(12)}"
        lifetime = 3600.0
        try:
            lifetime = float(self.expires_in) or 3600.0
        except (TypeError, ValueError):
            pass
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer"}
        if self.expires_in is not MISSING:
            body["expires_in"] = self.expires_in
        if self.expires_at is not MISSING:
            body["expires_at"] = self.expires_at
        if self.expires_at_after is not None:
            body["expires_at"] = int(self.now() + self.expires_at_after)
            lifetime = body["expires_at"] - self.now()
        self.access[access] = self.now() + lifetime
        if self.rotate if rotate is None else rotate:
            refresh = f"rt-{serial}-{secrets.token_hex(12)}"
            self.refresh[refresh] = False
            body["refresh_token"] = refresh
        body.update(self.extra)
        self.issued.append(body)
        return body

    async def _token(self, request: Request) -> Response:
        raw = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type == "application/json":
            fields = json.loads(raw)
        else:
            fields = dict(parse_qsl(raw.decode()))
        with self.lock:
            self.calls.append(TokenCall(content_type, fields, request.headers.get("authorization")))
            reply = self.replies.popleft() if self.replies else None
        delay = reply.delay if reply is not None else self.delay
        if delay:
            await asyncio.sleep(delay)
        if reply is not None and (reply.body is not None or reply.status != 200):
            return JSONResponse(reply.body or {}, status_code=reply.status, headers=reply.headers)
        grant = fields.get("grant_type")
        with self.lock:
            if grant == "refresh_token":
                token = fields.get("refresh_token")
                used = self.refresh.get(token)
                if used is None:
                    return _invalid_grant("unknown refresh token")
                if used:
                    self.reuses += 1
                    return _invalid_grant("refresh token already used")
                if self.rotate:
                    self.refresh[token] = True  # single use
            elif grant == "password":
                if fields.get("password") != TS_SECRETS["FRT_TS_PASSWORD"]:
                    return _invalid_grant("wrong username or password")
            elif grant != "client_credentials":
                return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
            return JSONResponse(self.issue())

    async def _data(self, request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        with self.lock:
            self.api_calls.append(dict(request.headers))
            expires = self.access.get(token)
            live = scheme.lower() == "bearer" and expires is not None and self.now() < expires
            self.api_statuses.append(200 if live else 401)
        if not live:
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        return JSONResponse({"ok": True, "items": [1, 2, 3]})

    async def _orders(self, request: Request) -> Response:
        """Acts for the user of the bearer JWT (claims read, as a gateway would have
        verified them): 201 with the ``orders:write`` role, else 403."""
        _, _, token = request.headers.get("authorization", "").partition(" ")
        with self.lock:
            self.api_calls.append(dict(request.headers))
        claims = jwt.claims(token) or {}
        if "orders:write" not in claims.get("roles", []):
            return JSONResponse({"message": "missing role orders:write"}, status_code=403)
        return JSONResponse({"id": 1, "created_by": claims.get("email")}, status_code=201)

    async def _redirect(self, request: Request) -> Response:
        with self.lock:
            self.api_calls.append(dict(request.headers))
        return RedirectResponse(request.query_params["to"], status_code=302)

    async def _echo(self, request: Request) -> Response:
        seen = {"headers": dict(request.headers), "query": dict(request.query_params)}
        with self.lock:
            self.echoes.append(seen)
        return JSONResponse(seen)


def _invalid_grant(description: str) -> Response:
    return JSONResponse(
        {"error": "invalid_grant", "error_description": description}, status_code=400
    )


@contextmanager
def start_token_server() -> Iterator[TokenServer]:
    token_server = TokenServer()
    with serve(token_server.app()) as server:
        token_server.base_url = server.base_url
        yield token_server


def ts_profile(base: str, name: str = "svc", extra: str = "", grant: str = "password") -> str:
    """An oauth2 profile against the TokenServer; ``extra`` is more YAML (or overrides)."""
    lines = {
        "name": name,
        "kind": "oauth2",
        "grant": grant,
        "base_url": f"{base}/api",
        "token_url": f"{base}/oauth/token",
        "client_id": "${{ secrets.FRT_TS_CLIENT_ID }}",
        "client_secret": "${{ secrets.FRT_TS_CLIENT_SECRET }}",
    }
    if grant == "password":
        lines["username"] = "${{ secrets.FRT_TS_USERNAME }}"
        lines["password"] = "${{ secrets.FRT_TS_PASSWORD }}"
    for line in textwrap.dedent(extra).strip().splitlines():
        key, _, value = line.partition(":")
        lines[key.strip()] = value.strip()
    return "\n".join(f"{key}: {value}" for key, value in lines.items()) + "\n"


# ---------------------------------------------------------------- child processes

# A process that builds its own runtime on the project and runs one flow. KILL_AT makes
# it die by SIGKILL at a chosen point of a token refresh; READY_FILE/GO_FILE line it up
# with another child so that both start their run at the same moment.
CHILD = r"""
import asyncio, json, os, signal, sys, time
from pathlib import Path

root, flow = Path(sys.argv[1]), sys.argv[2]
kill_at = os.environ.get("KILL_AT", "")

if kill_at == "after_response":
    # Dies with the token answer in hand: the server rotated the refresh token, the new
    # one never reached the store.
    import flowrunner.auth.oauth2 as oauth2
    original = oauth2.post_token_request

    async def dying(*args, **kwargs):
        data = await original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return data

    oauth2.post_token_request = dying
elif kill_at == "after_commit":
    # Dies right after the new tokens are committed, before using them.
    from flowrunner.store.tokens import TokenStore
    original_save = TokenStore.save

    def save(self, credential, **kwargs):
        original_save(self, credential, **kwargs)
        if credential.access_token and not credential.refresh_token_spent and (
            credential.last_refreshed_at is not None
            and time.time() - credential.last_refreshed_at.timestamp() < 5
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    TokenStore.save = save

from flowrunner.app import build_runtime


async def main():
    runtime = build_runtime(root)
    try:
        ready, go = os.environ.get("READY_FILE"), os.environ.get("GO_FILE")
        if ready and go:
            Path(ready).touch()
            deadline = time.monotonic() + 20
            while not Path(go).exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        record = await runtime.engine.run(flow, trigger={})
        refreshes = runtime.auth.tokens.refresh_count
    finally:
        await runtime.aclose()
    print(json.dumps({"status": record.status, "error": record.error, "refreshes": refreshes}))


asyncio.run(main())
"""


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILL_AT", "FLOWRUNNER_"))}
    env.update(extra)
    return env


def start_child(root: Path, flow: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 - our interpreter, our snippet
        [sys.executable, "-c", CHILD, str(root), flow],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(**env),
    )


def finish_child(process: subprocess.Popen[str]) -> tuple[int, dict[str, Any] | None, str]:
    """Wait (bounded); return the exit code, the printed result if any, and stderr."""
    try:
        out, err = process.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if lines else None
    return process.returncode, result, err


def run_child(root: Path, flow: str, **env: str) -> tuple[int, dict[str, Any] | None, str]:
    return finish_child(start_child(root, flow, **env))


def expire_stored_access_token(root: Path, profile: str) -> Credential:
    """Make the stored access token look expired to every process that reads the store;
    returns the credential as it was."""
    stored = load_credential(root, profile)
    assert stored is not None and stored.access_token
    past = datetime.now(UTC) - timedelta(minutes=1)
    save_credential(root, replace(stored, access_expires_at=past))
    return stored
