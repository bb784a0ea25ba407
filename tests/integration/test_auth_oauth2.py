"""oauth2 profiles against a real token endpoint: what the runner sends, how it reads the
answer (every ``expires_in`` form, absolute expiries, missing fields), and what it keeps
when the endpoint is busy, broken or refuses."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_auth_support import (
    MISSING,
    SANDBOX_SECRETS,
    TS_SECRETS,
    ClientClock,
    Reply,
    Sandbox,
    TokenServer,
    expire_stored_access_token,
    get_flow,
    load_credential,
    profile_state,
    run_once,
    save_credential,
    state_bytes,
    ts_profile,
    write_env,
)

from flowrunner.auth.tokens import post_token_request

ProjectFactory = Callable[..., Path]


@pytest.fixture
def project(make_project: ProjectFactory, server: TokenServer) -> Callable[..., Path]:
    """A project with one flow ``f`` calling the TokenServer's API through profile ``svc``."""

    def make(extra: str = "", grant: str = "password", secrets: dict[str, str] | None = None):
        root = make_project(
            {"f": get_flow("f", "svc", "data")},
            {"svc": ts_profile(server.base_url, extra=extra, grant=grant)},
        )
        write_env(root, TS_SECRETS | (secrets or {}))
        return root

    return make


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The token request's back-off pauses, recorded instead of slept."""
    recorded: list[float] = []

    async def no_sleep(seconds: float) -> None:
        recorded.append(seconds)

    assert post_token_request.__kwdefaults__ is not None
    monkeypatch.setitem(post_token_request.__kwdefaults__, "sleep", no_sleep)
    return recorded


async def succeed(root: Path, clock: Callable[[], datetime] | None = None) -> None:
    record = await run_once(root, "f", clock)
    assert record.status == "succeeded", record.error


# ---------------------------------------------------------------- reading the answer


@pytest.mark.parametrize("expires_in", [7200, "7200", "7200.0"])
async def test_expires_in_in_every_numeric_form_sets_the_expiry(
    server: TokenServer, project: Callable[..., Path], expires_in: Any
) -> None:
    """``expires_in`` as 7200, "7200" or "7200.0" gives the same expiry, and the token is
    reused by the next runs without another token call."""
    server.expires_in = expires_in
    root = project()
    before = datetime.now(UTC)
    await succeed(root)
    await succeed(root)
    stored = load_credential(root, "svc")
    assert stored is not None and stored.access_expires_at is not None
    lifetime = stored.access_expires_at - before
    assert timedelta(seconds=7200 - 60) < lifetime <= timedelta(seconds=7200)
    assert server.grants() == ["password"]


@pytest.mark.parametrize("expires_in", [MISSING, 0])
async def test_unknown_lifetime_is_used_until_a_401_then_refreshed_once(
    server: TokenServer, project: Callable[..., Path], expires_in: Any
) -> None:
    """With ``expires_in`` missing or 0 the token has no known expiry: it is used until the
    API answers 401, then refreshed once and the request resent."""
    server.expires_in = expires_in
    root = project()
    await succeed(root)
    stored = load_credential(root, "svc")
    assert stored is not None and stored.access_expires_at is None
    server.access.clear()  # the API now refuses the token
    await succeed(root)
    assert server.grants() == ["password", "refresh_token"]
    assert server.api_statuses == [200, 401, 200]
    assert server.reuses == 0


@pytest.mark.parametrize("form", ["epoch", "iso"])
async def test_absolute_expires_at_is_used_when_there_is_no_expires_in(
    server: TokenServer, project: Callable[..., Path], form: str
) -> None:
    """An answer with an absolute ``expires_at`` (epoch seconds or ISO 8601) and no
    ``expires_in`` expires the token at that moment."""
    moment = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=3)
    server.expires_in = MISSING
    server.expires_at = int(moment.timestamp()) if form == "epoch" else moment.isoformat()
    root = project()
    await succeed(root)
    stored = load_credential(root, "svc")
    assert stored is not None
    assert stored.access_expires_at == moment


@pytest.mark.parametrize("skew", [timedelta(minutes=-2), timedelta(minutes=2)])
async def test_a_clock_two_minutes_off_still_refreshes_before_expiry(
    server: TokenServer, project: Callable[..., Path], skew: timedelta
) -> None:
    """With the runner's clock 2 minutes behind or ahead of the server's, a token with an
    absolute expiry is refreshed before the server stops accepting it: no call ever gets a
    401, through the last minutes of the token's life."""
    server.expires_in = MISSING
    server.expires_at_after = 600
    clock = ClientClock(skew)
    root = project()
    await succeed(root, clock)
    # Real time moves on to 6, 7.5 and 9 minutes after issue, on both sides.
    for minutes in (6, 7.5, 9):
        server.clock_offset = minutes * 60
        clock.offset = skew + timedelta(minutes=minutes)
        await succeed(root, clock)
    assert 401 not in server.api_statuses
    grants = server.grants()
    assert grants[0] == "password" and len(grants) >= 2
    assert set(grants[1:]) == {"refresh_token"}


async def test_a_response_without_refresh_token_keeps_the_old_one(
    server: TokenServer, project: Callable[..., Path]
) -> None:
    """A refresh answered without a new refresh token keeps the one that was sent, usable
    again (not marked spent), and the next refresh uses it."""
    root = project()
    await succeed(root)
    first = load_credential(root, "svc")
    assert first is not None and first.refresh_token
    server.rotate = False
    for _ in range(2):
        expire_stored_access_token(root, "svc")
        await succeed(root)
        stored = load_credential(root, "svc")
        assert stored is not None
        assert stored.refresh_token == first.refresh_token
        assert not stored.refresh_token_spent
        assert stored.access_token != first.access_token
    assert server.grants() == ["password", "refresh_token", "refresh_token"]
    assert server.reuses == 0


async def test_a_refused_refresh_token_is_not_kept_by_a_login_without_one(
    server: TokenServer, project: Callable[..., Path]
) -> None:
    """When a refresh is refused (invalid_grant) and the password login that follows
    answers without a refresh token, the refused token is never sent again."""
    root = project()
    await succeed(root)
    first = load_credential(root, "svc")
    assert first is not None and first.refresh_token
    del server.refresh[first.refresh_token]  # the server forgot it
    server.rotate = False
    expire_stored_access_token(root, "svc")
    await succeed(root)
    expire_stored_access_token(root, "svc")
    await succeed(root)
    assert server.grants() == ["password", "refresh_token", "password", "password"]
    assert [c.fields.get("refresh_token") for c in server.calls].count(first.refresh_token) == 1


async def test_a_200_without_access_token_changes_nothing(
    server: TokenServer, project: Callable[..., Path]
) -> None:
    """A 200 answer without an access token fails the run with a message naming the profile,
    and the stored access and refresh tokens stay as they were."""
    root = project()
    await succeed(root)
    before = expire_stored_access_token(root, "svc")
    server.script(Reply(200, {"token_type": "Bearer", "expires_in": 3600}))
    record = await run_once(root, "f")
    assert record.status == "failed"
    assert record.error is not None
    assert "auth profile 'svc'" in record.error
    assert "without an access token" in record.error
    after = load_credential(root, "svc")
    assert after is not None
    assert after.access_token == before.access_token
    assert after.refresh_token == before.refresh_token


# ---------------------------------------------------------------- a busy or broken endpoint


async def test_429_with_retry_after_then_200_succeeds_and_keeps_tokens_meanwhile(
    server: TokenServer, project: Callable[..., Path], sleeps: list[float]
) -> None:
    """A token endpoint answering 429 (Retry-After: 7) then 200: the runner waits as told,
    the stored tokens stay in place while it waits, and the run succeeds."""
    root = project()
    await succeed(root)
    before = expire_stored_access_token(root, "svc")
    seen_while_waiting: list[Any] = []

    async def check_store(seconds: float) -> None:
        sleeps.append(seconds)
        seen_while_waiting.append(load_credential(root, "svc"))

    assert post_token_request.__kwdefaults__ is not None
    post_token_request.__kwdefaults__["sleep"] = check_store
    server.script(Reply(429, {"error": "slow_down"}, {"Retry-After": "7"}))
    await succeed(root)
    assert sleeps == [7.0]
    (waiting,) = seen_while_waiting
    assert waiting.access_token == before.access_token
    assert waiting.refresh_token == before.refresh_token
    assert server.grants() == ["password", "refresh_token", "refresh_token"]
    assert server.reuses == 0


async def test_5xx_exhausted_fails_clearly_and_keeps_the_stored_tokens(
    server: TokenServer, project: Callable[..., Path], sleeps: list[float]
) -> None:
    """Three 503 answers fail the run with an error naming the profile; the stored tokens
    (refresh token included, not marked spent) are kept, and the next run refreshes."""
    root = project()
    await succeed(root)
    before = expire_stored_access_token(root, "svc")
    server.script(*[Reply(503, {"error": "unavailable"}) for _ in range(3)])
    record = await run_once(root, "f")
    assert record.status == "failed"
    assert record.error is not None
    assert "auth profile 'svc'" in record.error and "503" in record.error
    assert "stored tokens are kept" in record.error
    assert len(sleeps) == 2
    kept = load_credential(root, "svc")
    assert kept is not None
    assert (kept.access_token, kept.refresh_token) == (before.access_token, before.refresh_token)
    assert not kept.refresh_token_spent
    assert kept.status == "ok"
    await succeed(root)
    assert server.grants() == ["password", *["refresh_token"] * 4]
    assert server.reuses == 0


async def test_a_busy_endpoint_during_the_refresh_margin_uses_the_still_valid_token(
    server: TokenServer, project: Callable[..., Path], sleeps: list[float]
) -> None:
    """When the refresh ahead of expiry meets a token endpoint that stays busy, the run uses
    the access token that is still valid for a few minutes instead of failing."""
    root = project()
    await succeed(root)
    stored = load_credential(root, "svc")
    assert stored is not None
    soon = datetime.now(UTC) + timedelta(minutes=3)  # inside the 5-minute margin
    save_credential(root, replace(stored, access_expires_at=soon))
    server.script(*[Reply(503, {"error": "unavailable"}) for _ in range(3)])
    await succeed(root)
    assert server.api_calls[-1]["authorization"] == f"Bearer {stored.access_token}"
    kept = load_credential(root, "svc")
    assert kept is not None and kept.refresh_token == stored.refresh_token
    assert not kept.refresh_token_spent


# ---------------------------------------------------------------- the refresh_token grant


def seed_project(project: Callable[..., Path], server: TokenServer, lifetime: str = "1d") -> Path:
    seed = server.issue()["refresh_token"]
    return project(
        extra=f"refresh_token: ${{{{ secrets.FRT_TS_SEED }}}}\nrefresh_token_lifetime: {lifetime}",
        grant="refresh_token",
        secrets={"FRT_TS_SEED": seed},
    )


async def test_refresh_token_grant_whose_token_lapsed_needs_login(
    server: TokenServer, project: Callable[..., Path]
) -> None:
    """A ``grant: refresh_token`` profile whose refresh token has lapsed sends nothing, turns
    ``needs_login``, and says what a human must do."""
    root = seed_project(project, server)
    await succeed(root)
    calls = len(server.calls)
    later = ClientClock(timedelta(days=2))  # past the 1-day refresh token lifetime
    record = await run_once(root, "f", later)
    assert record.status == "failed"
    assert record.error is not None
    assert "auth profile 'svc'" in record.error
    assert "new refresh token" in record.error and "flowrunner profiles check svc" in record.error
    assert len(server.calls) == calls
    state = await profile_state(root, "svc", later)
    assert state.status == "needs_login"
    assert state.last_error


async def test_refresh_token_grant_whose_token_is_spent_needs_login_until_a_new_one(
    server: TokenServer, project: Callable[..., Path]
) -> None:
    """A ``grant: refresh_token`` profile whose stored refresh token is spent (its answer was
    lost) never sends it again and turns ``needs_login``; a new refresh token put in the
    secrets brings it back to ``ok``."""
    root = seed_project(project, server, lifetime="90d")
    await succeed(root)
    stored = expire_stored_access_token(root, "svc")
    save_credential(
        root,
        replace(
            stored,
            refresh_token_spent=True,
            access_expires_at=datetime.now(UTC) - timedelta(minutes=1),
        ),
    )
    calls = len(server.calls)
    record = await run_once(root, "f")
    assert record.status == "failed"
    assert record.error is not None and "new refresh token" in record.error
    assert len(server.calls) == calls
    assert (await profile_state(root, "svc")).status == "needs_login"
    write_env(root, TS_SECRETS | {"FRT_TS_SEED": server.issue()["refresh_token"]})
    await succeed(root)
    assert (await profile_state(root, "svc")).status == "ok"
    assert server.reuses == 0


async def test_a_configured_refresh_token_that_is_not_rotated_keeps_working(
    sandbox: Sandbox, make_project: ProjectFactory
) -> None:
    """SuperOffice answers without a refresh token: the configured one stays the profile's
    refresh token, so the profile keeps working after its access token expires."""
    root = make_project(
        {"f": get_flow("f", "superoffice", "Contact")},
        {"superoffice": superoffice_profile(sandbox.base_url)},
    )
    write_env(root, SANDBOX_SECRETS)
    await succeed(root)
    later = ClientClock(timedelta(hours=2))
    sandbox.clock.offset = 2 * 3600
    await succeed(root, later)
    assert sandbox.state.tokens_issued["superoffice"] == 2
    assert (await profile_state(root, "superoffice", later)).status == "ok"


# ---------------------------------------------------------------- what the request looks like


@pytest.mark.parametrize("client_auth", ["body", "basic"])
@pytest.mark.parametrize("body_format", ["form", "json"])
async def test_client_auth_and_body_format_as_the_server_receives_them(
    server: TokenServer, project: Callable[..., Path], client_auth: str, body_format: str
) -> None:
    """``client_auth`` puts the client credentials in HTTP Basic or in the body, and
    ``body_format`` encodes the grant as a form or as JSON, as the token endpoint sees it."""
    root = project(extra=f"client_auth: {client_auth}\nbody_format: {body_format}")
    await succeed(root)
    (call,) = server.calls
    expected_type = (
        "application/json" if body_format == "json" else "application/x-www-form-urlencoded"
    )
    assert call.content_type == expected_type
    assert call.fields["grant_type"] == "password"
    assert call.fields["username"] == TS_SECRETS["FRT_TS_USERNAME"]
    assert call.fields["password"] == TS_SECRETS["FRT_TS_PASSWORD"]
    client_id, client_secret = TS_SECRETS["FRT_TS_CLIENT_ID"], TS_SECRETS["FRT_TS_CLIENT_SECRET"]
    if client_auth == "basic":
        pair = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        assert call.authorization == f"Basic {pair}"
        assert "client_id" not in call.fields and "client_secret" not in call.fields
    else:
        assert call.authorization is None
        assert (call.fields["client_id"], call.fields["client_secret"]) == (
            client_id,
            client_secret,
        )


def superoffice_profile(base: str) -> str:
    return f"""
        name: superoffice
        kind: oauth2
        grant: refresh_token
        base_url: {base}/superoffice/api/v1
        token_url: {base}/superoffice/login/common/oauth/tokens
        client_id: ${{{{ secrets.FRT_SO_CLIENT_ID }}}}
        client_secret: ${{{{ secrets.FRT_SO_CLIENT_SECRET }}}}
        refresh_token: ${{{{ secrets.FRT_SO_REFRESH }}}}
        capture:
          so_ticket: $.so_ticket
        headers:
          Authorization: Bearer ${{{{ token.access_token }}}}
          SO-Ticket: ${{{{ token.so_ticket }}}}
        """


async def test_captured_so_ticket_is_sent_as_a_header_and_never_recorded(
    sandbox: Sandbox, make_project: ProjectFactory
) -> None:
    """SuperOffice's ``so_ticket``, captured from the token answer, goes out in the
    ``SO-Ticket`` header (the sandbox refuses calls without the matching ticket), and is
    neither in the run record nor readable in the state database."""
    root = make_project(
        {"f": get_flow("f", "superoffice", "Contact")},
        {"superoffice": superoffice_profile(sandbox.base_url)},
    )
    write_env(root, SANDBOX_SECRETS)
    record = await run_once(root, "f")
    assert record.status == "succeeded", record.error
    (ticket,) = [g.ticket for g in sandbox.state.superoffice.sessions.values()]
    stored = load_credential(root, "superoffice")
    assert stored is not None and stored.extra["so_ticket"] == ticket
    assert ticket.encode() not in state_bytes(root)
    assert ticket not in repr(record)
