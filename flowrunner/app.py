"""The composition root: settings → state store, HTTP client, auth, engine."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from flowrunner.auth import ProfileAuth
from flowrunner.engine import Engine
from flowrunner.events import EventBus
from flowrunner.history import record_history
from flowrunner.http1 import Http1Transport, Http1Wire
from flowrunner.loader import Project, load_project
from flowrunner.notify import Notifier
from flowrunner.reminders import Reminders
from flowrunner.secrets import SecretStore
from flowrunner.store import Database, RunHistory, default_database_url
from flowrunner.store.crypto import TokenCipher
from flowrunner.store.database import STATE_DIR
from flowrunner.store.notifications import NotificationStore
from flowrunner.store.tokens import TokenStore
from flowrunner.wire import USER_AGENT, HttpxWire, Wire


class _NoCookies(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class FlowClient(httpx.AsyncClient):
    """No cookie jar: one client serves every run, flow and profile, and a cookie set by
    one API answer must not ride along on another run's requests (it also saves parsing
    every response through the standard library's cookie machinery)."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, value: object) -> None:
        return None


def make_client(transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    """The httpx client for what is not an http step (token endpoints, notifications): on
    the http step's own pool in a runtime (Http1Transport), or on the transport a test
    gives (httpx.MockTransport)."""
    return FlowClient(
        transport=transport, timeout=httpx.Timeout(30.0), headers={"User-Agent": USER_AGENT}
    )


def database_url(project: Project) -> str:
    url = project.settings.database_url
    if not url:
        return default_database_url(project.root)
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith(("/", ":memory:")):
        # A relative SQLite path belongs to the project, wherever the command runs from.
        return prefix + str(project.root / url[len(prefix) :])
    return url


@dataclass
class Runtime:
    project: Project
    database: Database
    history: RunHistory
    tokens: TokenStore
    auth: ProfileAuth
    engine: Engine
    client: httpx.AsyncClient
    notifier: Notifier
    reminders: Reminders
    wire: Wire

    async def aclose(self) -> None:
        await self.wire.aclose()
        await self.client.aclose()
        self.database.close()


def open_database(project: Project) -> tuple[Database, RunHistory]:
    database = Database.open(database_url(project))
    return database, RunHistory(database)


def prune_state(
    database: Database, before: datetime, stop: threading.Event | None = None
) -> tuple[int, int]:
    """Remove what ``history.keep`` no longer keeps: the finished runs that started before
    ``before``, and the notifications delivered before it (until done, or ``stop`` is
    set). How many of each."""
    runs = RunHistory(database).prune(before, stop)
    return runs, NotificationStore(database).prune_sent(before, stop)


def token_store(project: Project, database: Database) -> TokenStore:
    return TokenStore(database, TokenCipher.for_project(project.root / STATE_DIR))


def build_runtime(
    root: Path,
    *,
    project: Project | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    keep_history: bool = True,
    clock: Callable[[], datetime] | None = None,
    secrets: SecretStore | None = None,
) -> Runtime:
    project = project or load_project(root)
    database, history = open_database(project)
    secrets = secrets or SecretStore(project.root)
    bus = EventBus()
    if keep_history:
        record_history(bus, history)
    # http steps go through flowrunner's own HTTP/1.1 client; with a transport given
    # (httpx.MockTransport in tests), through the httpx client built on it.
    wire: Wire
    if transport is None:
        pool = Http1Wire()
        wire, client = pool, make_client(Http1Transport(pool))
    else:
        client = make_client(transport)
        wire = HttpxWire(client)
    tokens = token_store(project, database)
    auth = ProfileAuth(project, secrets, tokens, client, clock)
    engine = Engine(project, client, auth, secrets, bus, wire=wire)
    notifications = NotificationStore(database)
    notifier = Notifier(project.settings, secrets, notifications, client, clock)
    runtime = Runtime(
        project,
        database,
        history,
        tokens,
        auth,
        engine,
        client,
        notifier,
        Reminders(lambda: project, auth, notifications, notifier, clock),
        wire,
    )
    # The reminders follow the project the runtime holds, which serve swaps on reload.
    runtime.reminders.project = lambda: runtime.project
    return runtime


# Container allocations between two young collections (CPython's default is 700). A run
# allocates thousands of short-lived dicts and lists that reference counting frees
# anyway; collecting every 700 costs a few percent of a busy server for nothing.
YOUNG_COLLECTION_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Set the garbage collector up for a long-running server, once start-up is done.

    - What start-up built (modules, the loaded project, compiled expressions) is frozen:
      it lives as long as the process, and every full collection would walk it all again,
      tens of milliseconds during which no run, webhook or schedule moves. Frozen objects
      are still freed when nothing refers to them; only reference cycles among them (a
      project replaced by a reload) stay until exit.
    - Young collections run every ``YOUNG_COLLECTION_THRESHOLD`` allocations."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)
