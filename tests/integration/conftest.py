"""Fixtures of the engine's integration tests: a real upstream HTTP server, projects
written with its URL, and runtimes that are closed after each test.

The server (``upstream_server.create_upstream``) runs under uvicorn on 127.0.0.1, port 0,
in a background thread for the whole session.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from test_auth_support import Sandbox, TokenServer, start_sandbox, start_token_server
from upstream_server import Upstream, UpstreamState, create_upstream

from flowrunner.app import Runtime, build_runtime
from flowrunner.loader import load_project


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    state = UpstreamState()
    config = uvicorn.Config(
        create_upstream(state),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        http="h11",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="upstream", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the upstream test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Upstream(f"http://127.0.0.1:{port}", port, state)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


RuntimeFactory = Callable[..., Runtime]


@pytest.fixture
async def open_runtime() -> AsyncIterator[RuntimeFactory]:
    """Load a project (asserting it is valid) and build its runtime; closed at teardown."""
    opened: list[Runtime] = []

    def make(root: Path, **kwargs: Any) -> Runtime:
        project = load_project(root)
        assert project.problems == [], [p.format() for p in project.problems]
        runtime = build_runtime(root, project=project, **kwargs)
        opened.append(runtime)
        return runtime

    yield make
    for runtime in opened:
        await runtime.aclose()


ProjectWriter = Callable[..., Path]


@pytest.fixture
def write_project(make_project: Callable[..., Path], upstream: Upstream) -> ProjectWriter:
    """make_project, with @BASE@ (the upstream's URL), @PORT@ and @NAME@ tokens filled in."""

    def write(
        flows: dict[str, str] | None = None,
        profiles: dict[str, str] | None = None,
        **tokens: str,
    ) -> Path:
        values = {"BASE": upstream.base_url, "PORT": str(upstream.port), **tokens}

        def fill(text: str) -> str:
            for name, value in values.items():
                text = text.replace(f"@{name}@", value)
            return text

        return make_project(
            {name: fill(text) for name, text in (flows or {}).items()},
            {name: fill(text) for name, text in (profiles or {}).items()},
        )

    return write


# The auth tests' servers: one per module, reset before each test.


@pytest.fixture(scope="module")
def sandbox_server() -> Iterator[Sandbox]:
    with start_sandbox() as sandbox:
        yield sandbox


@pytest.fixture
def sandbox(sandbox_server: Sandbox) -> Sandbox:
    sandbox_server.reset()
    return sandbox_server


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    with start_token_server() as running:
        yield running


@pytest.fixture
def server(token_server: TokenServer) -> TokenServer:
    token_server.reset()
    return token_server
