"""A Starlette app served by uvicorn on 127.0.0.1 (a free port) in a background thread,
for tests that need a real HTTP peer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp


@contextmanager
def serve_in_thread(app: ASGIApp, name: str = "server", timeout: float = 10.0) -> Iterator[str]:
    """Yield the base URL once the server answers; stop it (bounded) afterwards."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    give_up = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > give_up:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
