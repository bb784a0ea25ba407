"""``flowrunner serve``: schedules, webhooks and run status in one process.

The Starlette app is assembled here from the runtime (engine, stores), the dispatcher,
the scheduler and the reloader; each of those knows nothing of HTTP serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flowrunner.app import Runtime, build_runtime, prune_state, tune_garbage_collector
from flowrunner.dispatcher import Dispatcher
from flowrunner.durations import format_duration
from flowrunner.errors import ConfigurationError, Problem
from flowrunner.events import RunEvent
from flowrunner.loader import Project, load_project
from flowrunner.metrics import Metrics
from flowrunner.reloader import reload_project, snapshot
from flowrunner.scheduling import FIRE_KEY_WINDOW, Scheduler, next_fire_times
from flowrunner.secrets import SecretStore
from flowrunner.store.crypto import TokenCipher
from flowrunner.store.database import STATE_DIR
from flowrunner.store.queue import Dedupe, RunQueue
from flowrunner.webhooks import Route as HookRoute
from flowrunner.webhooks import WebhookEndpoint, route_path, routes_of

log = logging.getLogger("flowrunner.server")
RELOAD_SECONDS = 1.0


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class Server:
    runtime: Runtime
    dispatcher: Dispatcher
    scheduler: Scheduler
    metrics: Metrics
    admin_token: str | None = None
    hooks: dict[str, HookRoute] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    reload_seconds: float = RELOAD_SECONDS
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # The history's prune runs in a thread: told to stop, and known to be done.
    _pruning: bool = False
    _prune_stop: threading.Event = field(default_factory=threading.Event)
    _prune_idle: threading.Event = field(default_factory=_set_event)

    @property
    def project(self) -> Project:
        return self.runtime.project

    async def fire(self, flow: str, index: int, fired_at: datetime) -> None:
        key = fired_at.astimezone(UTC).isoformat()
        trigger = {"kind": "schedule", "fired_at": key}
        submitted = await self.dispatcher.submit(
            flow, trigger, dedupe=Dedupe(f"schedule:{flow}#{index}", key, FIRE_KEY_WINDOW)
        )
        if submitted.status != "duplicate":
            log.info(
                "schedule fired %s at %s: run %s %s", flow, key, submitted.run_id, submitted.status
            )

    def swap(self, project: Project) -> None:
        """Make a (re)loaded project the one everything uses."""
        self.runtime.project = project
        self.runtime.engine.project = project
        self.runtime.auth.project = project
        self.hooks = routes_of(project)
        self.problems = list(project.problems)
        self.scheduler.sync({n: f.flow for n, f in project.flows.items()})

    async def housekeeping(self) -> None:
        """Keep-alive refreshes, reminders, status alerts, then deliveries; at start-up and
        every ``reminders.check_every``."""
        reminders = self.runtime.reminders
        for name, job in (("keep-alive", reminders.keep_alive),):
            try:
                await job()
            except Exception:
                log.exception("%s failed", name)
        for name, check in (
            ("reminders", reminders.send_due),
            ("status alerts", reminders.alert_status_changes),
            ("expired dedupe keys", self.dispatcher.queue.purge_expired_keys),
        ):
            try:
                check()
            except Exception:
                log.exception("%s failed", name)
        await self.prune()
        await self.deliver()

    async def prune(self) -> None:
        """Remove runs and delivered notifications older than ``history.keep``, off the
        event loop: a first prune of a long history takes a while."""
        keep = self.project.settings.history.keep
        if keep is None or self._pruning:  # none wanted, or one still going
            return
        before = datetime.now(UTC) - keep
        self._pruning = True
        try:
            runs, sent = await asyncio.to_thread(self._prune, before)
        except Exception:
            log.exception("pruning the history failed")
            return
        finally:
            self._pruning = False
        if runs or sent:
            log.info(
                "removed %d run(s) and %d delivered notification(s) from before %s "
                "(history.keep: %s)",
                runs,
                sent,
                before.isoformat(timespec="seconds"),
                format_duration(keep),
            )

    async def deliver(self) -> None:
        try:
            await self.runtime.notifier.deliver_due()
        except Exception:
            log.exception("delivering notifications failed")

    def on_run_event(self, event: RunEvent) -> None:
        if event.kind != "run_finished" or event.run.status != "failed":
            return
        quiet = self.project.settings.reminders.failure_quiet_period
        reminders = self.runtime.reminders
        alerted = reminders.alert_run_failure(event, quiet)
        changed = reminders.alert_status_changes()
        if alerted or changed:
            self._tasks.append(asyncio.create_task(self.deliver(), name="deliver"))

    async def start(self) -> None:
        self.runtime.database.checkpoint_in_background()
        self.swap(self.project)
        self.dispatcher.recover()
        self.runtime.engine.bus.subscribe(self.on_run_event)
        self.scheduler.every(
            "housekeeping", self.project.settings.reminders.check_every, self.housekeeping
        )
        self.scheduler.every("deliveries", timedelta(minutes=1), self.deliver)
        self.scheduler.start()
        self._tasks.append(asyncio.create_task(self.housekeeping(), name="housekeeping"))
        caught_up = await self.scheduler.catch_up(
            {n: f.flow for n, f in self.project.flows.items()}
        )
        if caught_up:
            log.info("checked %d schedule(s) for fires missed while stopped", caught_up)
        self._tasks.append(asyncio.create_task(self.dispatcher.run_forever(), name="dispatcher"))
        # Taken now, not when the task first runs: an edit made in between would be missed.
        seen = snapshot(self.project.root)
        self._tasks.append(asyncio.create_task(self._watch(seen), name="reloader"))
        log.info("serving %d flow(s), %d webhook(s)", len(self.project.flows), len(self.hooks))

    def _prune(self, before: datetime) -> tuple[int, int]:
        """In a thread: the prune, which ``stop`` ends between two of its transactions
        (or before the first, if it comes first)."""
        self._prune_idle.clear()
        try:
            runs, sent = prune_state(self.runtime.database, before, self._prune_stop)
            if self._prune_stop.is_set():
                log.info("pruning stopped by the shutdown, after %d run(s)", runs)
            return runs, sent
        finally:
            self._prune_idle.set()

    async def stop(self) -> None:
        self._prune_stop.set()
        self.scheduler.shutdown()
        await self.dispatcher.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A prune's thread outlives the task that awaited it: the database stays open for
        # the transaction it is in.
        if not await asyncio.to_thread(self._prune_idle.wait, 30):
            log.warning("the history's prune did not stop within 30 s; closing the database")
        await self.runtime.aclose()

    async def _watch(self, seen: dict[str, float]) -> None:
        while True:
            await asyncio.sleep(self.reload_seconds)
            try:
                now = snapshot(self.project.root)
                if now != seen:
                    seen = now
                    self.swap(reload_project(self.project))
                    log.info(
                        "reloaded: %d flow(s), %d problem(s)",
                        len(self.project.flows),
                        len(self.problems),
                    )
            except Exception:
                log.exception("reloading the project failed; the previous version keeps running")

    # ------------------------------------------------------------ HTTP endpoints

    async def run_status(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        record = self.runtime.history.get_run(run_id)
        if record is None:
            # Not in the history yet: waiting in the queue, or running (a run's start is
            # written only once it has lasted a moment).
            queued = self.dispatcher.queue.status(run_id)
            if queued is None and self.dispatcher.is_running(run_id):
                queued = "running"  # started before it was stored (a waited-for webhook)
            if queued is None:
                return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
            return JSONResponse({"run_id": run_id, "status": queued})
        return JSONResponse(
            {
                "run_id": record.id,
                "flow": record.flow,
                "status": record.status,
                "started_at": record.started_at.isoformat(),
                "finished_at": record.finished_at.isoformat() if record.finished_at else None,
                "user": record.user,
                "error": record.error,
                "outputs": record.outputs,
            }
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse(
            {"status": "ok", "flows": len(self.project.flows), "problems": len(self.problems)}
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def status(self, request: Request) -> Response:
        now = datetime.now(UTC)
        flows = {
            name: {
                "file": loaded.file,
                "webhooks": [f"/hooks/{w.path}" for w in loaded.flow.webhooks],
                "next_fires": sorted(
                    t.isoformat() for s in loaded.flow.schedules for t in next_fire_times(s, now)
                )[:3],
            }
            for name, loaded in sorted(self.project.flows.items())
        }
        return JSONResponse(
            {
                "flows": flows,
                "problems": [p.as_dict() for p in self.problems],
                "in_flight": self.dispatcher.in_flight,
            }
        )

    def asgi(self) -> ASGIApp:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        hooks = WebhookEndpoint(lambda: self.hooks, self.dispatcher, self.runtime.auth.secrets)
        app: ASGIApp = Starlette(
            routes=[
                Route("/runs/{run_id}", self.run_status, name="run_status"),
                Route("/healthz", self.healthz),
                Route("/metrics", self.metrics_endpoint),
                Route("/status", self.status),
            ],
            lifespan=lifespan,
        )
        if self.admin_token:
            app = AdminTokenGuard(app, self.admin_token)
        return HooksFirst(hooks, app)


class HooksFirst:
    """``/hooks/...`` goes straight to the webhook endpoint; everything else to ``app``.

    Starlette's routing and middleware around every webhook (matching each route in turn,
    a wrapper for exception handlers, none registered) cost about a tenth of what
    answering a webhook costs. An error of the endpoint's still reaches the server's 500."""

    def __init__(self, hooks: WebhookEndpoint, app: ASGIApp) -> None:
        self.hooks = hooks
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope).startswith("/hooks/"):
            await self.hooks(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class AdminTokenGuard:
    """When bound beyond loopback, everything but /hooks and /healthz needs the admin token."""

    OPEN = ("/hooks/", "/healthz")

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(self.OPEN):
            headers = dict(scope.get("headers") or [])
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                response = JSONResponse({"error": "the admin token is required"}, 401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_server(
    root: Path,
    *,
    host: str = "127.0.0.1",
    project: Project | None = None,
    clock: Callable[[], datetime] | None = None,
    secrets: SecretStore | None = None,
) -> Server:
    project = project or load_project(root)
    runtime = build_runtime(project.root, project=project, clock=clock, secrets=secrets)
    cipher = TokenCipher.for_project(project.root / STATE_DIR)
    queue = RunQueue(runtime.database, cipher, node=uuid.uuid4().hex[:12])
    settings = project.settings.server
    dispatcher = Dispatcher(
        queue, runtime.history, lambda: runtime.engine, settings.max_runs_in_flight
    )
    metrics = Metrics()
    metrics.subscribe(runtime.engine.bus)
    dispatcher.on_refused = lambda record: metrics.on_event(RunEvent("run_finished", record))
    metrics.gauges["flowrunner_queue_depth"] = lambda: float(queue.depth())
    metrics.gauges["flowrunner_runs_in_flight"] = lambda: float(dispatcher.in_flight)
    metrics.gauges["flowrunner_token_refreshes"] = lambda: float(runtime.auth.tokens.refresh_count)
    # The group commit at work: how many writes (intakes, run ends) share a transaction.
    writes = runtime.database.writes
    metrics.gauges["flowrunner_state_commits"] = lambda: float(writes.commits)
    metrics.gauges["flowrunner_state_writes"] = lambda: float(writes.written)
    admin_token = settings.admin_token
    if not _is_loopback(host) and not admin_token:
        raise ConfigurationError(
            f"binding {host} exposes the server beyond this machine: set server.admin_token "
            "in flowrunner.yaml (the UI and API will require it; /hooks and /healthz stay open)"
        )

    async def not_yet(flow: str, index: int, fired_at: datetime) -> None:
        """Replaced below by the server's own fire, once the server exists."""

    server = Server(
        runtime,
        dispatcher,
        Scheduler(not_yet, clock),
        metrics,
        admin_token if not _is_loopback(host) else None,
    )
    server.scheduler.fire = server.fire
    return server


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A request's line and headers may take this much, as h11 allows. uvicorn's httptools
# parser has no limit of its own: a header of 30 MB was read whole, and kept with the run.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
_HEAD_TOO_LARGE_REASON = (
    f"the request line and headers are larger than {MAX_REQUEST_HEAD_BYTES // 1024} KiB"
)
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n\r\n%s"
) % (len(_HEAD_TOO_LARGE_REASON), _HEAD_TOO_LARGE_REASON.encode())


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, which answers 431 and closes the connection when a
    request's line and headers are larger than MAX_REQUEST_HEAD_BYTES: as soon as that
    much has come without their end (what bounds the memory a request can take), or once
    they are complete."""

    _reading_head = True
    _head_bytes = 0  # received since the current request began, while in its head
    _refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._reading_head and self._head_bytes > MAX_REQUEST_HEAD_BYTES:
            self._refuse()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        # The line and every header with its ": " and CRLF (summed in C: every request).
        headers = self.headers
        size = len(self.url) + 4 * len(headers) + sum(map(len, chain.from_iterable(headers)))
        if size > MAX_REQUEST_HEAD_BYTES:
            self._refuse()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._reading_head, self._head_bytes = True, 0

    def _refuse(self) -> None:
        if self._refused:
            return
        self._refused = True
        log.info("a request refused: %s", _HEAD_TOO_LARGE_REASON)
        self.transport.write(_HEAD_TOO_LARGE)
        self.transport.close()


def serve(
    root: Path,
    host: str | None = None,
    port: int | None = None,
    secrets: SecretStore | None = None,
) -> None:
    project = load_project(root)
    settings = project.settings.server
    host = host or settings.host
    port = port if port is not None else settings.port
    server = build_server(root, host=host, project=project, secrets=secrets)
    for problem in project.problems:
        log.warning("%s", problem.format())
    config = uvicorn.Config(
        server.asgi(),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        http=BoundedHttpToolsProtocol,
    )
    tune_garbage_collector()
    run_until_signalled(uvicorn.Server(config))


def run_until_signalled(server: uvicorn.Server) -> None:
    """Run uvicorn until SIGTERM or SIGINT, and return once it has shut down gracefully.

    uvicorn raises the signal it stopped on again after its shutdown, which kills the
    process with that signal (exit status -15) after a clean stop; while it runs, its
    own handlers are installed, and the ones set here only absorb that second raise so
    that a graceful stop exits 0, as process managers expect.
    """
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in handled}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
