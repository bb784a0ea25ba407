"""Notifications delivered for real: email to an SMTP server on 127.0.0.1 (aiosmtpd),
webhooks to a local HTTP server in the JSON, Slack and Teams shapes, and the log; and
what happens while a channel is down: retries on the outbox's backoff, the failure
visible, no secret in it, nothing dropped. Time is a mutable clock; nothing sleeps."""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from local_server import serve_in_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from flowrunner.app import Runtime
from flowrunner.store.notifications import BACKOFF

ProjectFactory = Callable[..., Path]
RuntimeFactory = Callable[..., Runtime]

T0 = datetime(2025, 3, 3, 8, 0, tzinfo=UTC)
OWNER = "it-admins@acme.example"
OPS = "ops@acme.example"
SENDER = "flowrunner@acme.example"
SMTP_USER = "flowrunner-mailer"
SMTP_PASSWORD = "smtp-pw-Zq81!x"
HOOK_TOKEN = "hook-token-5e2d-91"
PROFILE_TOKEN_SECRET = "NOTIFY_TEST_IOBEYA_TOKEN"


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def make_jwt(iat: datetime, exp: datetime) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    claims = {"sub": "machine-user", "iat": int(iat.timestamp()), "exp": int(exp.timestamp())}
    return f"{part({'alg': 'HS256'})}.{part(claims)}.c2lnbmF0dXJl"


# ------------------------------------------------------------ servers


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: EmailMessage
    authenticated: bool


class Inbox:
    """An aiosmtpd handler that keeps what it receives; logins are checked against
    ``user``/``password`` when set."""

    def __init__(self, user: str | None = None, password: str | None = None) -> None:
        self.user = user
        self.password = password
        self.lock = threading.Lock()
        self.mails: list[Mail] = []
        self.logins: list[str] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.mails.append(
                Mail(
                    str(envelope.mail_from),
                    list(envelope.rcpt_tos),
                    message,
                    bool(session.authenticated),
                )
            )
        return "250 Message accepted for delivery"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login, password = data.login.decode(), data.password.decode()
        with self.lock:
            self.logins.append(login)
        ok = (login, password) == (self.user, self.password)
        return AuthResult(success=ok, handled=False)  # handled=False: answer 535 on failure

    def received(self) -> list[Mail]:
        with self.lock:
            return list(self.mails)


@contextlib.contextmanager
def smtp_server(inbox: Inbox, port: int | None = None, auth: bool = False) -> Iterator[int]:
    """An aiosmtpd server on 127.0.0.1 (a free port unless given) for the block's duration."""
    kwargs: dict[str, Any] = {}
    if auth:
        # AUTH offered on a plain connection (a local relay); the client logs in.
        kwargs = {"authenticator": inbox.authenticate, "auth_require_tls": False}
    for _ in range(5):  # a free port can be taken between the probe and the bind
        controller = Controller(
            inbox, hostname="127.0.0.1", port=port or free_port(), ready_timeout=5, **kwargs
        )
        try:
            controller.start()
        except OSError:
            if port is not None:
                raise
            continue
        try:
            yield controller.port
        finally:
            controller.stop()
        return
    raise RuntimeError("no free port for the SMTP server")


@dataclass
class Hooks:
    """What the webhook server received, per key; keys in ``failing`` answer 500."""

    base_url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=dict)

    def got(self, key: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received.get(key, []))

    def tried(self, key: str) -> int:
        with self.lock:
            return self.attempts.get(key, 0)


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    state = Hooks()

    async def receive(request: Request) -> Response:
        key = request.path_params["key"]
        body = await request.json()
        with state.lock:
            state.attempts[key] = state.attempts.get(key, 0) + 1
            failing = key in state.failing
            if not failing:
                state.received.setdefault(key, []).append(
                    {"json": body, "headers": dict(request.headers)}
                )
        if failing:
            # A careless server quoting the request back: the secret must still not leak.
            auth = request.headers.get("authorization", "")
            return PlainTextResponse(f"internal error handling request with {auth}", 500)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/hook/{key}", receive, methods=["POST"])])
    with serve_in_thread(app, "hooks") as base_url:
        state.base_url = base_url
        yield state


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_TEST_SMTP_USER", SMTP_USER)
    monkeypatch.setenv("NOTIFY_TEST_SMTP_PASSWORD", SMTP_PASSWORD)
    monkeypatch.setenv("NOTIFY_TEST_HOOK_TOKEN", HOOK_TOKEN)


def email_channel(port: int, login: bool = False) -> str:
    lines = f"""\
  mail:
    type: email
    to: [{OPS}]
    from: {SENDER}
    host: 127.0.0.1
    port: {port}
    security: none
"""
    if login:
        lines += """\
    username: ${{ secrets.NOTIFY_TEST_SMTP_USER }}
    password: ${{ secrets.NOTIFY_TEST_SMTP_PASSWORD }}
"""
    return lines


def hook_channel(name: str, url: str, fmt: str) -> str:
    return f"""\
  {name}:
    type: webhook
    url: {url}
    format: {fmt}
    headers: {{Authorization: "Bearer ${{{{ secrets.NOTIFY_TEST_HOOK_TOKEN }}}}"}}
"""


def settings(*channels: str, default: str = "[]") -> str:
    return "channels:\n" + "".join(channels) + f"default_notify: {default}\n"


# ------------------------------------------------------------ email


async def test_a_reminder_arrives_by_email_to_the_owner_and_the_channel(
    make_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reminder sent through an email channel reaches the SMTP server from the channel's
    sender, addressed to the channel's recipients and the profile's owner, with the
    reminder as subject and body and no token in it."""
    token = make_jwt(T0 - timedelta(days=355), T0 + timedelta(days=10))
    monkeypatch.setenv(PROFILE_TOKEN_SECRET, token)
    inbox = Inbox()
    with smtp_server(inbox) as smtp_port:
        profile = f"""\
name: iobeya-machine-user
kind: bearer
token: ${{{{ secrets.{PROFILE_TOKEN_SECRET} }}}}
allowed_hosts: [acme.iobeya.example]
owner: {OWNER}
notify: [mail]
"""
        root = make_project(
            {}, {"iobeya-machine-user": profile}, settings(email_channel(smtp_port))
        )
        runtime = open_runtime(root, clock=Clock(T0))
        [reminder] = runtime.reminders.send_due()
        assert await runtime.notifier.deliver_due() == (1, 0)

    [mail] = inbox.received()
    assert mail.sender == SENDER
    assert sorted(mail.recipients) == sorted([OPS, OWNER])
    assert mail.message["Subject"] == reminder.subject
    assert "iobeya-machine-user" in mail.message["Subject"]
    assert mail.message["From"] == SENDER
    body = mail.message.get_content().replace("\r\n", "\n")  # CRLF on the wire
    assert body.strip() == reminder.body.strip()
    assert "flowrunner profiles set-token iobeya-machine-user" in body
    assert token not in mail.message.as_string()
    [row] = runtime.notifier.store.all()
    assert (row.status, row.attempts, row.last_error) == ("sent", 1, None)


async def test_email_logs_in_with_the_channel_credentials(
    make_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An email channel with username and password (from secrets) logs in before sending;
    a refused login is a failed delivery whose stored error does not contain the password."""
    inbox = Inbox(SMTP_USER, SMTP_PASSWORD)
    clock = Clock(T0)
    with smtp_server(inbox, auth=True) as smtp_port:
        root = make_project(
            {}, {}, settings(email_channel(smtp_port, login=True), default="[mail]")
        )
        runtime = open_runtime(root, clock=clock)
        runtime.notifier.notify("test", "[flowrunner] hello", "Body line.", [], OWNER)
        assert await runtime.notifier.deliver_due() == (1, 0)
        [mail] = inbox.received()
        assert mail.authenticated
        assert inbox.logins == [SMTP_USER]
        assert mail.message["Subject"] == "[flowrunner] hello"

        wrong = "wrong-pw-Yv3Kq"
        monkeypatch.setenv("NOTIFY_TEST_SMTP_PASSWORD", wrong)
        runtime.notifier.notify("test", "[flowrunner] second", "Body.", [], OWNER)
        assert await runtime.notifier.deliver_due() == (0, 1)
    [failure] = runtime.notifier.store.failures()
    assert failure.subject == "[flowrunner] second"
    assert failure.last_error is not None and "535" in failure.last_error
    assert wrong not in failure.last_error
    assert SMTP_PASSWORD not in failure.last_error
    assert len(inbox.received()) == 1


async def test_email_to_a_server_that_is_down_is_retried_until_it_is_back(
    make_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An SMTP server that refuses connections fails the delivery, which waits out the
    backoff and goes through once a server listens there; the password never shows in the
    stored error or the log."""
    port = free_port()
    clock = Clock(T0)
    root = make_project({}, {}, settings(email_channel(port, login=True), default="[mail]"))
    runtime = open_runtime(root, clock=clock)
    runtime.notifier.notify("test", "[flowrunner] while down", "Body.", [], OWNER)

    with caplog.at_level(logging.WARNING, logger="flowrunner.notify"):
        assert await runtime.notifier.deliver_due() == (0, 1)
    [failure] = runtime.notifier.store.failures()
    assert failure.last_error is not None
    assert "ConnectionRefusedError" in failure.last_error
    assert failure.next_attempt_at == T0 + BACKOFF[0]
    assert SMTP_PASSWORD not in failure.last_error
    assert SMTP_PASSWORD not in caplog.text
    assert "via mail failed (attempt 1)" in caplog.text

    inbox = Inbox(SMTP_USER, SMTP_PASSWORD)
    with smtp_server(inbox, port, auth=True):
        assert await runtime.notifier.deliver_due() == (0, 0)  # not due yet
        clock.advance(BACKOFF[0])
        assert await runtime.notifier.deliver_due() == (1, 0)
    [mail] = inbox.received()
    assert mail.message["Subject"] == "[flowrunner] while down"
    assert runtime.notifier.store.failures() == []
    [row] = runtime.notifier.store.all()
    assert (row.status, row.attempts) == ("sent", 2)


# ------------------------------------------------------------ webhooks and the log


async def test_webhook_channels_post_json_slack_and_teams_payloads(
    make_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    hooks: Hooks,
) -> None:
    """A webhook channel POSTs the notification as plain JSON, as a Slack message or as a
    Teams adaptive card, with the channel's headers rendered from secrets."""
    base = f"{hooks.base_url}/hook"
    root = make_project(
        {},
        {},
        settings(
            hook_channel("plain", f"{base}/plain", "json"),
            hook_channel("slack", f"{base}/slack", "slack"),
            hook_channel("teams", f"{base}/teams", "teams"),
            default="[plain, slack, teams]",
        ),
    )
    runtime = open_runtime(root, clock=Clock(T0))
    ids = runtime.notifier.notify("profile:x", "[flowrunner] x: expiring", "Do this.", [])
    assert len(ids) == 3
    assert await runtime.notifier.deliver_due() == (3, 0)

    [plain] = hooks.got("plain")
    assert plain["json"] == {
        "subject": "[flowrunner] x: expiring",
        "body": "Do this.",
        "topic": "profile:x",
    }
    assert plain["headers"]["authorization"] == f"Bearer {HOOK_TOKEN}"
    assert plain["headers"]["content-type"] == "application/json"
    [slack] = hooks.got("slack")
    assert slack["json"] == {"text": "*[flowrunner] x: expiring*\nDo this."}
    [teams] = hooks.got("teams")
    assert teams["json"]["type"] == "message"
    [attachment] = teams["json"]["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard"
    assert [block["text"] for block in card["body"]] == ["[flowrunner] x: expiring", "Do this."]
    assert all(block["type"] == "TextBlock" for block in card["body"])


async def test_the_log_channel_logs_at_warning(
    make_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The log channel writes the subject and body as one WARNING record."""
    root = make_project({}, {}, "channels: {log: {type: log}}\ndefault_notify: [log]\n")
    runtime = open_runtime(root, clock=Clock(T0))
    runtime.notifier.notify("flow:f", "[flowrunner] f: run failed", "Run r1 failed: boom", [])
    with caplog.at_level(logging.DEBUG, logger="flowrunner.notify"):
        assert await runtime.notifier.deliver_due() == (1, 0)
    [record] = [r for r in caplog.records if r.name == "flowrunner.notify"]
    assert record.levelno == logging.WARNING
    assert "[flowrunner] f: run failed" in record.getMessage()
    assert "Run r1 failed: boom" in record.getMessage()


async def test_a_failing_webhook_is_retried_on_the_backoff_until_it_answers(
    make_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    hooks: Hooks,
) -> None:
    """A webhook answering 500 fails each attempt; the outbox row waits 1 min, 5 min,
    15 min, 1 h, then 4 h between attempts, is not tried before, stays listed as a failure
    with a masked error, and is delivered once, when the server answers again."""
    key = "down-then-up"
    hooks.failing.add(key)
    clock = Clock(T0)
    root = make_project(
        {},
        {},
        settings(hook_channel("hook", f"{hooks.base_url}/hook/{key}", "json"), default="[hook]"),
    )
    runtime = open_runtime(root, clock=clock)
    store = runtime.notifier.store
    [item_id] = runtime.notifier.notify("t", "[flowrunner] down", "Body.", [])

    for attempt in range(7):
        assert await runtime.notifier.deliver_due() == (0, 1)
        [failure] = store.failures()
        assert failure.id == item_id
        assert failure.attempts == attempt + 1
        delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
        assert failure.next_attempt_at == clock() + delay
        assert failure.last_error is not None
        assert "500" in failure.last_error
        assert HOOK_TOKEN not in failure.last_error
        assert "Bearer ***" in failure.last_error  # the server quoted it; we masked it
        clock.advance(delay - timedelta(seconds=1))
        assert await runtime.notifier.deliver_due() == (0, 0)  # not before its time
        clock.advance(timedelta(seconds=1))
    assert hooks.tried(key) == 7
    assert list(BACKOFF) == [
        timedelta(minutes=1),
        timedelta(minutes=5),
        timedelta(minutes=15),
        timedelta(hours=1),
        timedelta(hours=4),
    ]

    hooks.failing.discard(key)
    assert await runtime.notifier.deliver_due() == (1, 0)
    assert await runtime.notifier.deliver_due() == (0, 0)
    assert store.failures() == []
    [row] = store.all()
    assert (row.status, row.attempts, row.last_error) == ("sent", 8, None)
    [received] = hooks.got(key)
    assert received["json"]["subject"] == "[flowrunner] down"


async def test_a_webhook_on_a_closed_port_is_kept_and_retried(
    make_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    closed_port: int,
) -> None:
    """A webhook nobody listens to fails with a connection error; the row is kept as a
    failure (never dropped) and retried at its next attempt time."""
    clock = Clock(T0)
    url = f"http://127.0.0.1:{closed_port}/hook?token=${{{{ secrets.NOTIFY_TEST_HOOK_TOKEN }}}}"
    root = make_project({}, {}, settings(hook_channel("hook", url, "slack"), default="[hook]"))
    runtime = open_runtime(root, clock=clock)
    runtime.notifier.notify("t", "[flowrunner] nobody listens", "Body.", [])
    assert await runtime.notifier.deliver_due() == (0, 1)
    clock.advance(BACKOFF[0])
    assert await runtime.notifier.deliver_due() == (0, 1)
    [failure] = runtime.notifier.store.failures()
    assert failure.attempts == 2
    assert failure.next_attempt_at == clock() + BACKOFF[1]
    assert failure.last_error
    assert HOOK_TOKEN not in failure.last_error
    assert runtime.notifier.store.all() == [failure]


async def test_a_notification_with_no_channel_still_reaches_the_log(
    make_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no channel to send to (default_notify: []), nothing is queued, and the
    notification is logged at WARNING instead of vanishing."""
    root = make_project({}, {}, "default_notify: []\n")
    runtime = open_runtime(root, clock=Clock(T0))
    with caplog.at_level(logging.WARNING, logger="flowrunner.notify"):
        assert runtime.notifier.notify("flow:f", "[flowrunner] f: run failed", "Why.", []) == []
    assert runtime.notifier.store.all() == []
    [record] = [r for r in caplog.records if r.name == "flowrunner.notify"]
    assert record.levelno == logging.WARNING
    assert "[flowrunner] f: run failed" in record.getMessage()
