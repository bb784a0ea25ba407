"""session profiles: a login request whose answer is a token (Tripletex's session token
sent as Basic ``0:<token>``; webCRM's JWT with a rotating refresh token)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from test_auth_support import (
    SANDBOX_SECRETS,
    ClientClock,
    Sandbox,
    get_flow,
    load_credential,
    profile_state,
    run_once,
    write_env,
)

from flowrunner.sandbox.state import SandboxSettings

ProjectFactory = Callable[..., Path]
TRIPLETEX_LOGIN = "PUT /tripletex/v2/token/session/:create"
INVOICES = "GET /tripletex/v2/invoice"


def tripletex(make_project: ProjectFactory, base: str) -> Path:
    root = make_project(
        {
            "invoices": get_flow(
                "invoices",
                "tripletex",
                "invoice?invoiceDateFrom=2000-01-01&invoiceDateTo=2100-01-01",
            )
        },
        {
            "tripletex": f"""
                name: tripletex
                kind: session
                base_url: {base}/tripletex/v2
                login:
                  method: PUT
                  url: {base}/tripletex/v2/token/session/:create
                  query:
                    consumerToken: ${{{{ secrets.FRT_TRIPLETEX_CONSUMER }}}}
                    employeeToken: ${{{{ secrets.FRT_TRIPLETEX_EMPLOYEE }}}}
                    expirationDate: ${{{{ (now() + timedelta(days=2)) | datetime('%Y-%m-%d') }}}}
                token: $.value.token
                expires_at: $.value.expirationDate
                headers:
                  Authorization: Basic ${{{{ ('0:' ~ token.access_token) | b64encode }}}}
                """
        },
    )
    write_env(root, SANDBOX_SECRETS)
    return root


def webcrm(make_project: ProjectFactory, base: str) -> Path:
    root = make_project(
        {"organisations": get_flow("organisations", "webcrm", "Organisations")},
        {
            "webcrm": f"""
                name: webcrm
                kind: session
                base_url: {base}/webcrm
                login:
                  method: POST
                  url: {base}/webcrm/Auth/ApiLogin
                  query: {{authCode: "${{{{ secrets.FRT_WEBCRM_APP_TOKEN }}}}"}}
                token: $.AccessToken
                expires_in: $.ExpiresIn
                refresh_token: $.RefreshToken
                refresh:
                  method: POST
                  url: {base}/webcrm/Auth/ApiRefresh
                  json: {{refreshToken: "${{{{ token.refresh_token }}}}"}}
                """
        },
    )
    write_env(root, SANDBOX_SECRETS)
    return root


async def test_tripletex_logs_in_once_and_sends_basic_zero_token(
    sandbox: Sandbox, make_project: ProjectFactory
) -> None:
    """Tripletex's consumer and employee tokens buy a session token, sent as Basic
    ``0:<token>`` (the sandbox accepts nothing else) and reused by the next run."""
    root = tripletex(make_project, sandbox.base_url)
    for _ in range(2):
        record = await run_once(root, "invoices")
        assert record.status == "succeeded", record.error
    assert sandbox.requests(TRIPLETEX_LOGIN) == 1
    assert sandbox.requests(INVOICES) == 2
    stored = load_credential(root, "tripletex")
    assert stored is not None and stored.access_token in sandbox.state.tripletex.sessions
    assert record.steps[0].response is not None
    assert record.steps[0].response["body"]["fullResultSize"] > 0


async def test_tripletex_logs_in_again_when_the_server_ends_the_session(
    sandbox: Sandbox, make_project: ProjectFactory
) -> None:
    """A session the server ended before the date it announced is refused with 401: the
    runner logs in again once and resends, and the run succeeds."""
    sandbox.state.settings = SandboxSettings(session_ttl=60)
    root = tripletex(make_project, sandbox.base_url)
    assert (await run_once(root, "invoices")).status == "succeeded"
    sandbox.clock.offset = 120
    record = await run_once(root, "invoices")
    assert record.status == "succeeded", record.error
    assert sandbox.requests(TRIPLETEX_LOGIN) == 2
    assert sandbox.requests(INVOICES) == 3  # the first run, the 401, the resend


async def test_tripletex_renews_a_session_past_its_expiration_date_before_sending(
    sandbox: Sandbox, make_project: ProjectFactory
) -> None:
    """A session whose expirationDate has passed by the runner's clock is renewed with a
    login before the request is sent (no request goes out with the old token)."""
    root = tripletex(make_project, sandbox.base_url)
    assert (await run_once(root, "invoices")).status == "succeeded"
    later = ClientClock(timedelta(days=2, hours=1))
    record = await run_once(root, "invoices", later)
    assert record.status == "succeeded", record.error
    assert sandbox.requests(TRIPLETEX_LOGIN) == 2
    assert sandbox.requests(INVOICES) == 2


async def test_webcrm_rotates_its_refresh_token_and_logs_in_again_when_it_lapses(
    sandbox: Sandbox, make_project: ProjectFactory
) -> None:
    """webCRM's single-use refresh token is rotated on every refresh and never presented
    twice; once it has lapsed, the application token logs in again and the profile stays
    ``ok``."""
    root = webcrm(make_project, sandbox.base_url)
    clock = ClientClock()
    seen: list[str | None] = []
    for hours in (0, 2, 4):
        clock.offset = timedelta(hours=hours)
        record = await run_once(root, "organisations", clock)
        assert record.status == "succeeded", record.error
        stored = load_credential(root, "webcrm")
        assert stored is not None
        seen.append(stored.refresh_token)
    assert len(set(seen)) == 3
    assert sandbox.requests("POST /webcrm/Auth/ApiLogin") == 1
    assert sandbox.requests("POST /webcrm/Auth/ApiRefresh") == 2

    for grant in sandbox.state.webcrm.refresh_tokens.values():
        grant.expires_at = 0  # every refresh token has lapsed
    clock.offset = timedelta(hours=6)
    record = await run_once(root, "organisations", clock)
    assert record.status == "succeeded", record.error
    assert sandbox.requests("POST /webcrm/Auth/ApiLogin") == 2
    assert sandbox.reuses == 0
    assert (await profile_state(root, "webcrm", clock)).status == "ok"
