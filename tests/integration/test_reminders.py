"""Credential deadlines, reminders before them, keep-alive refreshes and alerts, against
the real state store and a local token server. Time is a mutable clock handed to the
runtime: a year goes by in a loop, nothing sleeps."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from local_server import serve_in_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flowrunner.app import Runtime, build_runtime
from flowrunner.events import RunEvent
from flowrunner.loader import load_project
from flowrunner.model import BearerProfile
from flowrunner.profile_status import profile_states
from flowrunner.reminders import Reminder, calendar
from flowrunner.secrets import Masker
from flowrunner.store.runs import RunRecord
from flowrunner.store.tokens import ProfileStatus

ProjectFactory = Callable[..., Path]
RuntimeFactory = Callable[..., Runtime]

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
SECRET = "REMINDERS_TEST_IOBEYA_TOKEN"
PROFILE = "iobeya-machine-user"
OWNER = "it-admins@acme.example"
THRESHOLDS = [30 * 86400, 14 * 86400, 7 * 86400, 86400, 0]

BEARER = f"""\
name: {PROFILE}
kind: bearer
token: ${{{{ secrets.{SECRET} }}}}
allowed_hosts: [acme.iobeya.example]
regenerate_every: 365d
owner: {OWNER}
"""

FLOW = f"""\
name: copy-cards
triggers:
  - schedule: {{every: 15m}}
steps:
  - id: card
    http:
      method: POST
      url: https://acme.iobeya.example/s/api/cards
      auth: {PROFILE}
      json: {{title: x}}
"""

OTHER_FLOW = f"""\
name: archive-cards
steps:
  - id: cards
    for_each: ${{{{ [1, 2] }}}}
    steps:
      - id: card
        http:
          method: DELETE
          url: https://acme.iobeya.example/s/api/cards/${{{{ item }}}}
          auth: {PROFILE}
"""


def make_jwt(iat: datetime | None, exp: datetime | None, sub: str = "machine-user") -> str:
    """A JWT as iObeya issues them; the signature is never verified, so any will do."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    claims: dict[str, Any] = {"sub": sub}
    if iat is not None:
        claims["iat"] = int(iat.timestamp())
    if exp is not None:
        claims["exp"] = int(exp.timestamp())
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.bm90LWEtc2lnbmF0dXJl"


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


@pytest.fixture
def bearer_project(make_project: ProjectFactory) -> ProjectFactory:
    def make(profile: str = BEARER, settings: str | None = None) -> Path:
        return make_project(
            {"copy-cards": FLOW, "archive-cards": OTHER_FLOW}, {PROFILE: profile}, settings
        )

    return make


def walk(
    runtime: Runtime, clock: Clock, start: datetime, end: datetime, step: timedelta
) -> list[tuple[datetime, Reminder]]:
    """Call send_due at every step from start to end inclusive; what went out, and when."""
    sent = []
    clock.now = start
    while clock.now <= end:
        sent += [(clock.now, reminder) for reminder in runtime.reminders.send_due()]
        clock.advance(step)
    return sent


def state_of(runtime: Runtime, clock: Clock, name: str = PROFILE) -> Any:
    return next(s for s in profile_states(runtime.auth, clock()) if s.name == name)


# ------------------------------------------------------------ a year of a bearer token


async def test_a_year_long_token_gets_each_reminder_once_on_its_day(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 365-day token walked through its year gets exactly five reminders (30, 14, 7 and 1
    days before, then on expiry), each on its day, each once, each saying what to do."""
    token = make_jwt(T0, T0 + 365 * DAY)
    monkeypatch.setenv(SECRET, token)
    clock = Clock(T0)
    runtime = open_runtime(bearer_project(), clock=clock)

    sent = walk(runtime, clock, T0, T0 + 333 * DAY, DAY)
    # The last month hour by hour: each reminder goes out at its moment, not an hour early.
    sent += walk(runtime, clock, T0 + 334 * DAY, T0 + 367 * DAY, HOUR)

    assert [(moment - T0, r.threshold) for moment, r in sent] == [
        (timedelta(days=335), 30 * 86400),
        (timedelta(days=351), 14 * 86400),
        (timedelta(days=358), 7 * 86400),
        (timedelta(days=364), 86400),
        (timedelta(days=365), 0),
    ]
    assert [r.covers for _, r in sent] == [(t,) for t in THRESHOLDS]
    deadline = T0 + 365 * DAY
    for _, reminder in sent:
        text = reminder.subject + "\n" + reminder.body
        assert PROFILE in reminder.subject
        assert "archive-cards, copy-cards" in reminder.body  # every flow that uses it
        assert f"{deadline:%Y-%m-%d %H:%M} UTC" in reminder.body
        assert OWNER in reminder.body
        assert "as the machine user" in reminder.body
        assert "Generate a new token" in reminder.body
        assert f"flowrunner profiles set-token {PROFILE}" in reminder.body
        assert reminder.deadline.series in reminder.body  # the fingerprint identifies it
        assert token not in text
        assert token.split(".")[1] not in text  # not even its claims
    assert "in 30 days" in sent[0][1].subject
    assert "in 24 hours" in sent[3][1].subject
    assert "overdue" in sent[4][1].subject
    assert "expired on" in sent[4][1].body

    # One outbox row per reminder on the default channel, addressed to the owner.
    rows = runtime.notifier.store.all()
    assert [row.subject for row in rows] == [r.subject for _, r in sent]
    assert {row.channel for row in rows} == {"log"}
    assert all(row.recipients == [OWNER] for row in rows)
    assert all(token not in row.body for row in rows)
    assert await runtime.notifier.deliver_due() == (5, 0)


async def test_a_restart_neither_repeats_nor_skips_a_reminder(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new runtime on the same state directory continues the series where the old one
    stopped: a reminder already sent is not sent again, and one that fell due while the
    runner was down goes out when it is back."""
    monkeypatch.setenv(SECRET, make_jwt(T0, T0 + 365 * DAY))
    root = bearer_project()
    clock = Clock(T0)
    first = build_runtime(root, project=load_project(root), clock=clock)
    try:
        sent = walk(first, clock, T0 + 330 * DAY, T0 + 351 * DAY, DAY)
    finally:
        await first.aclose()
    assert [(m - T0).days for m, _ in sent] == [335, 351]

    # Restarted the same day as the 14-day reminder: not repeated.
    second = open_runtime(root, clock=clock)
    clock.now = T0 + 351 * DAY + HOUR
    assert second.reminders.send_due() == []
    deadline = second.reminders.deadlines()[0]
    assert second.reminders.next_reminder_at(deadline) == T0 + 358 * DAY
    await second.aclose()

    # Down from day 352 to day 359, over the 7-day threshold: caught up once when back.
    third = open_runtime(root, clock=clock)
    later = walk(third, clock, T0 + 359 * DAY, T0 + 366 * DAY, DAY)
    assert [((m - T0).days, r.threshold) for m, r in later] == [
        (359, 7 * 86400),
        (364, 86400),
        (365, 0),
    ]
    assert len(third.notifier.store.all()) == 5  # 335, 351, 358 (late), 364, 365


async def test_a_new_token_set_with_set_token_starts_a_fresh_series(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Storing a regenerated token (set-token) ends the old token's reminders and starts a
    new series for the new one, from its first threshold."""
    old = make_jwt(T0, T0 + 365 * DAY)
    monkeypatch.setenv(SECRET, old)
    clock = Clock(T0)
    runtime = open_runtime(bearer_project(), clock=clock)
    assert [(m - T0).days for m, _ in walk(runtime, clock, T0, T0 + 352 * DAY, DAY)] == [335, 351]

    issued = T0 + 353 * DAY
    new = make_jwt(issued, issued + 365 * DAY)
    profile = runtime.project.profiles[PROFILE].profile
    assert isinstance(profile, BearerProfile)
    runtime.auth.set_bearer_token(profile, new)

    sent = walk(runtime, clock, issued, issued + 329 * DAY, 7 * DAY)
    sent += walk(runtime, clock, issued + 330 * DAY, issued + 366 * DAY, DAY)
    assert [((m - issued).days, r.threshold) for m, r in sent] == [
        (335, 30 * 86400),
        (351, 14 * 86400),
        (358, 7 * 86400),
        (364, 86400),
        (365, 0),
    ]
    assert {r.deadline.series for _, r in sent} == {state_of(runtime, clock).fingerprint}
    assert all(r.deadline.moment == issued + 365 * DAY for _, r in sent)


async def test_a_new_token_in_the_environment_starts_a_fresh_series(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Changing the token's secret (the environment) is a new credential too: its own
    reminders go out, while the old token's last ones never do."""
    monkeypatch.setenv(SECRET, make_jwt(T0, T0 + 365 * DAY))
    clock = Clock(T0 + 360 * DAY)
    runtime = open_runtime(bearer_project(), clock=clock)
    first = runtime.reminders.send_due()
    assert [r.threshold for r in first] == [7 * 86400]  # the catch-up of a late first look

    issued = T0 + 361 * DAY
    monkeypatch.setenv(SECRET, make_jwt(issued, issued + 20 * DAY))  # a short one, for once
    clock.now = issued
    second = runtime.reminders.send_due()
    assert [(r.threshold, r.covers) for r in second] == [(30 * 86400, (30 * 86400,))]
    assert second[0].deadline.moment == issued + 20 * DAY
    assert second[0].deadline.series != first[0].deadline.series


# ------------------------------------------------------------ first sight, late


async def test_a_token_first_seen_past_thresholds_gets_one_catch_up_reminder(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token first seen with 10 days left gets one reminder (the 14-day one, covering the
    30-day one too), not two; the next one is due 7 days before; it is expiring until its
    expiry and expired after."""
    now = T0 + 100 * DAY
    expiry = now + 10 * DAY
    monkeypatch.setenv(SECRET, make_jwt(expiry - 365 * DAY, expiry))
    clock = Clock(now)
    runtime = open_runtime(bearer_project(), clock=clock)
    reminders = runtime.reminders

    deadline = reminders.deadlines()[0]
    assert deadline.moment == expiry
    assert reminders.next_reminder_at(deadline) == now  # one is due now, not sent yet
    assert state_of(runtime, clock).status == ProfileStatus.EXPIRING

    due = reminders.due()
    assert len(due) == 1
    assert (due[0].threshold, due[0].covers) == (14 * 86400, (30 * 86400, 14 * 86400))
    assert "in 10 days" in due[0].subject
    assert reminders.due() == due  # due() only looks
    sent = reminders.send_due()
    assert [r.threshold for r in sent] == [14 * 86400]
    assert reminders.send_due() == []
    assert len(runtime.notifier.store.all()) == 1
    assert reminders.next_reminder_at(deadline) == expiry - 7 * DAY

    clock.now = expiry - 7 * DAY
    assert [r.threshold for r in reminders.send_due()] == [7 * 86400]
    assert reminders.next_reminder_at(deadline) == expiry - DAY

    clock.now = expiry - timedelta(seconds=1)
    assert state_of(runtime, clock).status == ProfileStatus.EXPIRING
    clock.now = expiry
    assert state_of(runtime, clock).status == ProfileStatus.EXPIRED


async def test_an_expired_token_gets_one_overdue_reminder(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token already expired at first sight gets a single 'overdue' reminder saying it
    expired and what to do, then nothing more is scheduled."""
    expiry = T0 - 2 * DAY
    token = make_jwt(expiry - 365 * DAY, expiry)
    monkeypatch.setenv(SECRET, token)
    clock = Clock(T0)
    runtime = open_runtime(bearer_project(), clock=clock)

    assert state_of(runtime, clock).status == ProfileStatus.EXPIRED
    sent = runtime.reminders.send_due()
    assert len(sent) == 1
    assert sent[0].threshold == 0
    assert sent[0].covers == tuple(THRESHOLDS)
    assert "overdue" in sent[0].subject
    assert f"expired on {expiry:%Y-%m-%d %H:%M} UTC" in sent[0].body
    assert f"flowrunner profiles set-token {PROFILE}" in sent[0].body
    assert token not in sent[0].body
    assert runtime.reminders.next_reminder_at(runtime.reminders.deadlines()[0]) is None
    clock.advance(30 * DAY)
    assert runtime.reminders.send_due() == []
    assert len(runtime.notifier.store.all()) == 1


async def test_states_follow_the_first_threshold(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A profile is ok until its first reminder threshold, expiring inside it, expired from
    its expiry on, with expires_at and regenerate_by read from the token."""
    expiry = T0 + 365 * DAY
    monkeypatch.setenv(SECRET, make_jwt(T0, expiry))
    clock = Clock(T0)
    runtime = open_runtime(bearer_project(), clock=clock)

    state = state_of(runtime, clock)
    assert (state.status, state.expires_at, state.regenerate_by) == ("ok", expiry, expiry)
    assert state.owner == OWNER
    clock.now = expiry - 30 * DAY - timedelta(seconds=1)
    assert state_of(runtime, clock).status == "ok"
    clock.now = expiry - 30 * DAY
    assert state_of(runtime, clock).status == "expiring"
    clock.now = expiry + timedelta(seconds=1)
    assert state_of(runtime, clock).status == "expired"


async def test_regeneration_policy_earlier_than_expiry_is_the_deadline(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token valid two years under a yearly regeneration policy is due for regeneration
    one year after its iat: that is the deadline reminded of and shown."""
    monkeypatch.setenv(SECRET, make_jwt(T0, T0 + 730 * DAY))
    clock = Clock(T0)
    runtime = open_runtime(bearer_project(), clock=clock)

    state = state_of(runtime, clock)
    assert state.expires_at == T0 + 730 * DAY
    assert state.regenerate_by == T0 + 365 * DAY
    deadline = runtime.reminders.deadlines()[0]
    assert (deadline.moment, deadline.what) == (T0 + 365 * DAY, "must be regenerated")
    assert runtime.reminders.next_reminder_at(deadline) == T0 + 335 * DAY

    clock.now = T0 + 340 * DAY
    assert state_of(runtime, clock).status == "expiring"
    sent = runtime.reminders.send_due()
    assert [r.threshold for r in sent] == [30 * 86400]
    assert "must be regenerated" in sent[0].subject
    assert f"{T0 + 365 * DAY:%Y-%m-%d %H:%M} UTC" in sent[0].body


async def test_project_reminder_policy_applies_to_profiles_without_their_own(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """flowrunner.yaml's reminders.remind_before is the thresholds of every profile that
    does not set its own remind_before; a profile's own list wins."""
    expiry = T0 + 365 * DAY
    monkeypatch.setenv(SECRET, make_jwt(T0, expiry))
    clock = Clock(T0)
    settings = "reminders:\n  remind_before: [3d]\n"
    runtime = open_runtime(bearer_project(settings=settings), clock=clock)
    assert runtime.reminders.deadlines()[0].thresholds == (3 * 86400, 0)
    sent = walk(runtime, clock, T0 + 330 * DAY, expiry, DAY)
    assert [(m - T0).days for m, _ in sent] == [362, 365]
    clock.now = expiry - 4 * DAY
    assert state_of(runtime, clock).status == "ok"
    clock.now = expiry - 3 * DAY
    assert state_of(runtime, clock).status == "expiring"

    own = BEARER + "remind_before: [10d]\n"
    runtime = open_runtime(bearer_project(own, settings=settings), clock=clock)
    assert runtime.reminders.deadlines()[0].thresholds == (10 * 86400, 0)


async def test_an_expiry_written_in_another_time_zone_is_reported_in_utc(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token that is not a JWT expires at the profile's expires_at; one written with a
    UTC offset is reminded of at the right moment and shown in UTC."""
    monkeypatch.setenv(SECRET, "opaque-machine-user-token-0001")
    profile = BEARER.replace("regenerate_every: 365d\n", "expires_at: 2025-06-01T12:00:00+02:00\n")
    clock = Clock(datetime(2025, 5, 31, 10, 0, tzinfo=UTC))  # 24 hours before
    runtime = open_runtime(bearer_project(profile), clock=clock)

    [reminder] = runtime.reminders.send_due()
    assert reminder.threshold == 86400
    assert "in 24 hours" in reminder.subject
    assert "expires on 2025-06-01 10:00 UTC" in reminder.body
    assert "opaque-machine-user-token-0001" not in reminder.body


# ------------------------------------------------------------ calendar


async def test_calendar_is_valid_icalendar_with_the_deadline(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """calendar() is an RFC 5545 file: CRLF lines of at most 75 octets, balanced
    BEGIN/END, one event whose DTSTART is the deadline, an alarm per threshold."""
    expiry = T0 + 365 * DAY
    monkeypatch.setenv(SECRET, make_jwt(T0, expiry))
    clock = Clock(T0)
    runtime = open_runtime(bearer_project(), clock=clock)

    text = calendar(runtime.reminders.deadlines(), clock())
    events = check_icalendar(text)
    assert len(events) == 1
    event = events[0]
    assert event["DTSTART"] == f"{expiry:%Y%m%dT%H%M%SZ}"
    assert PROFILE in event["SUMMARY"]
    assert f"set-token {PROFILE}" in event["DESCRIPTION"]
    assert event["TRIGGER"] == ["-PT43200M", "-PT20160M", "-PT10080M", "-PT1440M"]


def check_icalendar(text: str) -> list[dict[str, Any]]:
    """Parse an iCalendar text strictly enough to catch what calendar apps choke on; the
    properties of each VEVENT (TRIGGER collects its alarms')."""
    raw = text.encode("utf-8")
    assert raw.endswith(b"\r\n")
    physical = raw[:-2].split(b"\r\n")
    assert all(b"\n" not in line and b"\r" not in line for line in physical)
    assert all(len(line) <= 75 for line in physical), [x for x in physical if len(x) > 75]
    logical: list[str] = []
    for line in physical:
        if line.startswith((b" ", b"\t")):
            assert logical, "a continuation line comes first"
            logical[-1] += line[1:].decode("utf-8")
        else:
            logical.append(line.decode("utf-8"))
    stack: list[str] = []
    events: list[dict[str, Any]] = []
    for line in logical:
        name, sep, value = line.partition(":")
        assert sep, line
        if name == "BEGIN":
            stack.append(value)
            if value == "VEVENT":
                events.append({"TRIGGER": []})
        elif name == "END":
            assert stack and stack.pop() == value, line
        elif name == "TRIGGER":
            events[-1]["TRIGGER"].append(value)
        elif stack and stack[-1] == "VEVENT":
            events[-1][name] = value.replace("\\,", ",")
    assert stack == []
    assert logical[0] == "BEGIN:VCALENDAR"
    assert logical[-1] == "END:VCALENDAR"
    assert "VERSION:2.0" in logical
    assert any(line.startswith("PRODID:") for line in logical)
    for event in events:
        assert {"UID", "DTSTAMP", "DTSTART"} <= set(event)
    return events


# ------------------------------------------------------------ keep-alive


@dataclass
class TokenEndpoint:
    base_url: str
    refuse: set[str] = field(default_factory=set)
    grants: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0

    def seen(self, key: str) -> list[str]:
        with self.lock:
            return list(self.grants.get(key, []))


@pytest.fixture(scope="module")
def token_endpoint() -> Iterator[TokenEndpoint]:
    """An OAuth2 token endpoint on 127.0.0.1 issuing single-use refresh tokens per key;
    a key in ``refuse`` gets invalid_grant for every grant."""
    endpoint = TokenEndpoint("")

    async def token(request: Request) -> Response:
        key = request.path_params["key"]
        form = dict(parse_qsl((await request.body()).decode()))
        grant = form.get("grant_type", "")
        with endpoint.lock:
            endpoint.grants.setdefault(key, []).append(grant)
            endpoint.issued += 1
            serial = endpoint.issued
        if key in endpoint.refuse:
            # Careless, as some are: the description quotes what was sent.
            sent = form.get("password") or form.get("refresh_token")
            return JSONResponse(
                {"error": "invalid_grant", "error_description": f"{grant} refused: {sent}"}, 400
            )
        return JSONResponse(
            {
                "access_token": f"access-{key}-{serial}",
                "refresh_token": f"refresh-{key}-{serial}",
                "expires_in": "7200",
                "token_type": "Bearer",
            }
        )

    app = Starlette(routes=[Route("/token/{key}", token, methods=["POST"])])
    with serve_in_thread(app, "token-endpoint") as base_url:
        endpoint.base_url = base_url
        yield endpoint


def oauth2_profile(endpoint: TokenEndpoint, key: str) -> str:
    return f"""\
name: ermeo-service-account
kind: oauth2
grant: password
token_url: {endpoint.base_url}/token/{key}
client_id: flowrunner
username: ${{{{ secrets.REMINDERS_TEST_ERMEO_USER }}}}
password: ${{{{ secrets.REMINDERS_TEST_ERMEO_PASSWORD }}}}
refresh_token_lifetime: 14d
keep_alive: true
owner: {OWNER}
"""


async def test_keep_alive_refreshes_before_the_refresh_token_lapses_and_alerts_on_refusal(
    make_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    token_endpoint: TokenEndpoint,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """keep_alive() refreshes an oauth2 profile whose refresh token is past half its life
    although no flow ran, leaves a young one alone, and when the token endpoint refuses,
    queues one alert to the owner at once (not one per check, and no second one for the
    needs_login status), with no secret in it or in the log."""
    password = "pw-7731-keepalive"
    monkeypatch.setenv("REMINDERS_TEST_ERMEO_USER", "svc-flowrunner")
    monkeypatch.setenv("REMINDERS_TEST_ERMEO_PASSWORD", password)
    key = "keepalive"
    name = "ermeo-service-account"
    root = make_project({}, {name: oauth2_profile(token_endpoint, key)})
    clock = Clock(T0)
    runtime = open_runtime(root, clock=clock)
    reminders = runtime.reminders

    await runtime.auth.credential(name, Masker())  # the first login
    assert token_endpoint.seen(key) == ["password"]
    stored = runtime.tokens.load(name)
    assert stored is not None and stored.refresh_expires_at == T0 + 14 * DAY

    clock.now = T0 + 6 * DAY  # 8 of 14 days left: nothing to do yet
    assert await reminders.keep_alive() == []
    assert token_endpoint.seen(key) == ["password"]

    clock.now = T0 + 8 * DAY  # 6 days left, no flow ran: refresh now
    assert await reminders.keep_alive() == [name]
    assert token_endpoint.seen(key) == ["password", "refresh_token"]
    stored = runtime.tokens.load(name)
    assert stored is not None and stored.refresh_expires_at == T0 + 22 * DAY
    state = next(s for s in profile_states(runtime.auth, clock()) if s.name == name)
    assert (state.status, state.refresh_lapses_at) == ("ok", T0 + 22 * DAY)
    assert runtime.notifier.store.all() == []

    token_endpoint.refuse.add(key)
    clock.now = T0 + 16 * DAY
    with caplog.at_level(logging.DEBUG):
        assert await reminders.keep_alive() == []
        [row] = runtime.notifier.store.all()
        assert "keep-alive refresh failed" in row.subject
        assert row.recipients == [OWNER]
        assert "refused" in row.body
        assert password not in row.body
        assert "***" in row.body  # the endpoint quoted the password; the alert masks it
        assert reminders.alert_status_changes() == []  # needs_login: already told
        clock.advance(HOUR)
        assert await reminders.keep_alive() == []  # still refused: still one alert
        assert len(runtime.notifier.store.all()) == 1
    assert password not in caplog.text
    assert token_endpoint.seen(key)[-1] == "password"  # it did try to log in again

    token_endpoint.refuse.discard(key)  # a human fixed the account
    clock.advance(HOUR)
    assert await reminders.keep_alive() == [name]
    token_endpoint.refuse.add(key)
    clock.now = T0 + 30 * DAY
    assert await reminders.keep_alive() == []
    assert len(runtime.notifier.store.all()) == 2  # a new failure, a new alert


# ------------------------------------------------------------ alerts


async def test_a_status_change_alerts_once_per_change(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A profile turning rejected, forbidden or needs_login alerts its owner once per change:
    checking again sends nothing, recovering sends nothing, turning bad again alerts again."""
    token = make_jwt(T0, T0 + 365 * DAY)
    monkeypatch.setenv(SECRET, token)
    clock = Clock(T0)
    root = bearer_project()
    (root / "auth_profiles" / "ermeo.yaml").write_text(
        "name: ermeo-service-account\nkind: oauth2\ngrant: refresh_token\n"
        "token_url: https://api.ermeo.example/oauth/v2/token\n"
        "refresh_token: ${{ secrets.REMINDERS_TEST_ERMEO_REFRESH }}\n"
        f"owner: {OWNER}\n"
    )
    runtime = open_runtime(root, clock=clock)
    reminders = runtime.reminders
    profile = runtime.project.profiles[PROFILE].profile
    assert isinstance(profile, BearerProfile)

    def check_twice() -> list[str]:
        clock.advance(HOUR)
        first = reminders.alert_status_changes()
        assert reminders.alert_status_changes() == []
        return first

    assert check_twice() == []
    runtime.auth.mark_rejected(PROFILE, token)  # a 401 before expiry
    assert check_twice() == [PROFILE]
    [row] = runtime.notifier.store.all()
    assert row.subject == f"[flowrunner] {PROFILE}: credential rejected"
    assert row.recipients == [OWNER]
    assert "copy-cards" in row.body
    assert "set-token" in row.body
    assert token not in row.body

    new = make_jwt(T0 + DAY, T0 + 366 * DAY)
    runtime.auth.set_bearer_token(profile, new)  # the administrator's fix: no alert
    assert check_twice() == []
    runtime.tokens.set_status(PROFILE, ProfileStatus.FORBIDDEN)  # a 403
    assert check_twice() == [PROFILE]
    runtime.tokens.set_status(PROFILE, ProfileStatus.OK)  # a success again
    assert check_twice() == []
    runtime.auth.mark_rejected(PROFILE, new)
    assert check_twice() == [PROFILE]
    runtime.tokens.set_status("ermeo-service-account", ProfileStatus.NEEDS_LOGIN, "refused")
    assert check_twice() == ["ermeo-service-account"]

    subjects = [row.subject for row in runtime.notifier.store.all()]
    assert subjects == [
        f"[flowrunner] {PROFILE}: credential rejected",
        f"[flowrunner] {PROFILE}: credential forbidden",
        f"[flowrunner] {PROFILE}: credential rejected",
        "[flowrunner] ermeo-service-account: credential needs login",
    ]


def failed_run(flow: str, run_id: str) -> RunEvent:
    record = RunRecord(
        id=run_id,
        flow=flow,
        status="failed",
        trigger={"type": "schedule"},
        inputs={},
        started_at=T0,
        error="step card: the API answered 500",
    )
    return RunEvent("run_finished", record)


async def test_run_failures_alert_once_per_quiet_period_per_flow(
    bearer_project: ProjectFactory,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed run alerts; another failure of the same flow inside the quiet period does
    not, one after it does; another flow has its own quiet period; successes never alert."""
    monkeypatch.setenv(SECRET, make_jwt(T0, T0 + 365 * DAY))
    clock = Clock(T0)
    runtime = open_runtime(bearer_project(), clock=clock)
    reminders = runtime.reminders
    quiet = timedelta(hours=1)

    assert reminders.alert_run_failure(failed_run("copy-cards", "run-0001"), quiet)
    clock.advance(timedelta(minutes=59))
    assert not reminders.alert_run_failure(failed_run("copy-cards", "run-0002"), quiet)
    assert reminders.alert_run_failure(failed_run("archive-cards", "run-0003"), quiet)
    clock.advance(timedelta(minutes=1))
    assert reminders.alert_run_failure(failed_run("copy-cards", "run-0004"), quiet)

    ok = RunRecord("run-0005", "copy-cards", "succeeded", {}, {}, T0)
    clock.advance(2 * HOUR)
    assert not reminders.alert_run_failure(RunEvent("run_finished", ok), quiet)
    started = RunRecord("run-0006", "copy-cards", "failed", {}, {}, T0)
    assert not reminders.alert_run_failure(RunEvent("run_started", started), quiet)

    rows = runtime.notifier.store.all()
    assert [(row.topic, row.body.split(" ")[1]) for row in rows] == [
        ("flow:copy-cards", "run-0001"),
        ("flow:archive-cards", "run-0003"),
        ("flow:copy-cards", "run-0004"),
    ]
    assert "the API answered 500" in rows[0].body
    assert "flowrunner runs show" in rows[0].body
