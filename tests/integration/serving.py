"""A flowrunner server in the test's event loop, for the serve tests (webhooks, dispatcher,
schedules, reload): ``build_server`` → ``Server.start()`` (what the ASGI lifespan does),
and an ``httpx.AsyncClient`` over ``httpx.ASGITransport`` on its app.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from flowrunner.server import Server, build_server
from flowrunner.store.runs import RunRecord

BASE = "http://flowrunner.test"
FINAL = ("succeeded", "failed", "skipped", "interrupted")


@dataclass
class Served:
    """A started server and a client that talks to its ASGI app."""

    server: Server
    client: httpx.AsyncClient
    stopped: bool = False

    @property
    def root(self) -> Path:
        return self.server.project.root

    def runs(self, flow: str | None = None) -> list[RunRecord]:
        return self.server.runtime.history.list_runs(flow, limit=10_000)

    def run(self, run_id: str) -> RunRecord:
        record = self.server.runtime.history.get_run(run_id)
        assert record is not None, f"no run {run_id}"
        return record

    def table(self, name: str) -> list[tuple[Any, ...]]:
        """Rows of a state table, read through a connection of our own (committed data only)."""
        with sqlite3.connect(self.root / ".flowrunner" / "state.db") as conn:
            return list(conn.execute(f"SELECT * FROM {name}"))  # noqa: S608 - our table names

    def pause(self) -> None:
        """The dispatcher starts nothing until resume()."""
        self.server.dispatcher.max_in_flight = 0

    def resume(self, max_in_flight: int = 64) -> None:
        self.server.dispatcher.max_in_flight = max_in_flight
        self.server.dispatcher._wake.set()

    async def finished(self, run_id: str, seconds: float = 10) -> RunRecord:
        """The run once it has finished (bounded wait)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            record = self.server.runtime.history.get_run(run_id)
            if record is not None and record.status in FINAL:
                return record
            await asyncio.sleep(0.02)
        raise AssertionError(f"run {run_id} did not finish within {seconds} s")

    async def until(self, check: Callable[[], bool], seconds: float = 10) -> None:
        """Wait (bounded) until ``check()`` holds."""
        deadline = time.monotonic() + seconds
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached within {seconds} s: {check}")
            await asyncio.sleep(0.02)

    async def quiet(self, seconds: float = 10) -> list[RunRecord]:
        """Every run once nothing is queued, running or still to be written (a finished
        run's intake row is removed with the next group commit), bounded."""
        await self.until(
            lambda: (
                self.server.dispatcher.queue.depth() == 0
                and self.server.dispatcher.in_flight == 0
                and self.server.runtime.database.writes.pending == 0
                and all(r.status in FINAL for r in self.runs())
            ),
            seconds,
        )
        return self.runs()

    async def stop(self, grace: float = 2) -> None:
        if not self.stopped:
            self.stopped = True
            await self.client.aclose()
            await self.server.dispatcher.stop(grace=grace)
            await self.server.stop()


ServeFactory = Callable[..., Awaitable[Served]]


@dataclass
class ServerPool:
    """Starts servers on project directories; ``async with`` stops them all."""

    started: list[Served] = field(default_factory=list)

    async def start(
        self,
        root: Path,
        *,
        paused: bool = False,
        reload_seconds: float | None = None,
        **kwargs: Any,
    ) -> Served:
        server = build_server(root, **kwargs)
        if paused:
            server.dispatcher.max_in_flight = 0
        if reload_seconds is not None:
            server.reload_seconds = reload_seconds
        await server.start()
        transport = httpx.ASGITransport(app=server.asgi())
        served = Served(server, httpx.AsyncClient(transport=transport, base_url=BASE))
        self.started.append(served)
        return served

    async def __aenter__(self) -> ServerPool:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for served in reversed(self.started):
            await served.stop()
