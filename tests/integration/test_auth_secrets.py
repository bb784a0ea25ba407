"""Credentials at rest and in flight: encrypted in the state database, never in a log
line, run record or error message, and never sent to a host outside ``allowed_hosts``."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_auth_support import (
    ERMEO_TOKEN,
    SANDBOX_SECRETS,
    TS_SECRETS,
    Reply,
    Sandbox,
    TokenServer,
    ermeo_profile,
    expire_stored_access_token,
    get_flow,
    run_once,
    runtime_for,
    state_bytes,
    ts_profile,
    write_env,
)
from typer.testing import CliRunner

from flowrunner.auth.tokens import post_token_request
from flowrunner.cli import app
from flowrunner.errors import ConfigurationError
from flowrunner.store.crypto import KEY_ENV
from flowrunner.store.database import STATE_DIR

ProjectFactory = Callable[..., Path]


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def ermeo_project(make_project: ProjectFactory, sandbox: Sandbox) -> Path:
    root = make_project(
        {"assets": get_flow("assets", "ermeo", "assets?site=HQ")},
        {"ermeo": ermeo_profile(sandbox.base_url)},
    )
    write_env(root, SANDBOX_SECRETS)
    return root


def sandbox_tokens(sandbox: Sandbox) -> set[str]:
    """Every token the sandbox handed out, and every demo secret."""
    state = sandbox.state
    values = set(SANDBOX_SECRETS.values())
    values |= set(state.ermeo.access_tokens) | set(state.ermeo.refresh_tokens)
    values |= set(state.tripletex.sessions) | set(state.superoffice.sessions)
    values |= {grant.ticket for grant in state.superoffice.sessions.values()}
    values |= set(state.webcrm.refresh_tokens)
    return values


# ---------------------------------------------------------------- at rest


async def test_the_state_database_holds_no_token_in_clear_text(
    sandbox: Sandbox, make_project: ProjectFactory
) -> None:
    """After a login and a refresh, no access token, refresh token or password appears
    anywhere in the raw bytes of the SQLite files (WAL included)."""
    root = ermeo_project(make_project, sandbox)
    assert (await run_once(root, "assets")).status == "succeeded"
    expire_stored_access_token(root, "ermeo")
    assert (await run_once(root, "assets")).status == "succeeded"
    raw = state_bytes(root)
    assert b"ermeo" in raw  # the profile's row is there ...
    tokens = sandbox_tokens(sandbox)
    assert len(sandbox.state.ermeo.refresh_tokens) == 2
    for value in tokens:
        assert value.encode() not in raw, value  # ... its tokens are not readable


async def test_a_wrong_secret_key_fails_closed(
    sandbox: Sandbox, make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens stored under one FLOWRUNNER_SECRET_KEY cannot be read under another: the
    store raises a ConfigurationError naming the variable, the run fails saying which
    profile and which key, and nothing is sent to the token endpoint (the stored tokens are
    not silently replaced)."""
    root = ermeo_project(make_project, sandbox)
    monkeypatch.setenv(KEY_ENV, "the right passphrase")
    assert (await run_once(root, "assets")).status == "succeeded"
    monkeypatch.setenv(KEY_ENV, "a wrong passphrase")
    async with runtime_for(root) as runtime:
        with pytest.raises(ConfigurationError, match=KEY_ENV):
            runtime.tokens.load("ermeo")
        record = await runtime.engine.run("assets", trigger={})
    assert record.status == "failed"
    assert record.error is not None and KEY_ENV in record.error
    assert "auth profile 'ermeo'" in record.error and "internal error" not in record.error
    assert sandbox.requests(ERMEO_TOKEN) == 1
    monkeypatch.setenv(KEY_ENV, "the right passphrase")
    assert (await run_once(root, "assets")).status == "succeeded"
    assert sandbox.requests(ERMEO_TOKEN) == 1


async def test_profiles_under_a_wrong_secret_key_fails_clearly(
    sandbox: Sandbox, make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flowrunner profiles`` under a FLOWRUNNER_SECRET_KEY that cannot decrypt the stored
    tokens exits non-zero saying which key to restore, without a traceback or a token."""
    root = ermeo_project(make_project, sandbox)
    monkeypatch.setenv(KEY_ENV, "the right passphrase")
    assert (await run_once(root, "assets")).status == "succeeded"
    monkeypatch.setenv(KEY_ENV, "a wrong passphrase")

    def invoke() -> Any:
        return CliRunner().invoke(app, ["profiles", "--project", str(root)])

    result = await asyncio.to_thread(invoke)
    assert result.exit_code not in (0, None)
    assert KEY_ENV in " ".join(result.output.split())
    assert not isinstance(result.exception, ConfigurationError), result.exception
    for token in sandbox_tokens(sandbox):
        assert token not in result.output


async def test_without_the_env_variable_a_key_file_is_created_with_mode_0600(
    sandbox: Sandbox, make_project: ProjectFactory
) -> None:
    """Without FLOWRUNNER_SECRET_KEY a key file is created once in the state directory,
    readable by its owner only, and reused by later runs."""
    root = ermeo_project(make_project, sandbox)
    assert (await run_once(root, "assets")).status == "succeeded"
    key_file = root / STATE_DIR / "secret.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = key_file.read_bytes()
    assert (await run_once(root, "assets")).status == "succeeded"
    assert key_file.read_bytes() == key
    assert sandbox.requests(ERMEO_TOKEN) == 1


# ---------------------------------------------------------------- logs, records, errors


async def test_no_secret_in_logs_run_records_or_errors(
    sandbox: Sandbox,
    server: TokenServer,
    make_project: ProjectFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Logins, refreshes, 401 resends, an API echoing the Authorization header, a login
    URL carrying secrets in its query and a token endpoint quoting the refused refresh
    token: no access token, refresh token, password, client secret or session token
    reaches a log line (DEBUG included), a run record (raw bytes of the database) or an
    error message."""
    caplog.set_level(logging.DEBUG)

    async def no_sleep(seconds: float) -> None:
        pass

    assert post_token_request.__kwdefaults__ is not None
    monkeypatch.setitem(post_token_request.__kwdefaults__, "sleep", no_sleep)
    base = sandbox.base_url
    root = make_project(
        {
            "assets": get_flow("assets", "ermeo", "assets?site=HQ"),
            "echo": get_flow("echo", "svc", f"{server.base_url}/echo"),
            "data": get_flow("data", "svc", "data"),
            "invoices": get_flow(
                "invoices",
                "tripletex",
                "invoice?invoiceDateFrom=2000-01-01&invoiceDateTo=2100-01-01",
            ),
        },
        {
            "ermeo": ermeo_profile(base),
            "svc": ts_profile(server.base_url),
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
                    expirationDate: "2100-01-01"
                token: $.value.token
                headers:
                  Authorization: Basic ${{{{ ('0:' ~ token.access_token) | b64encode }}}}
                """,
        },
    )
    write_env(root, SANDBOX_SECRETS | TS_SECRETS)
    records = []
    for flow in ("assets", "echo", "data", "invoices"):
        records.append(await run_once(root, flow))
    # A 401 on a live token: refresh and resend.
    async with httpx.AsyncClient() as client:
        await client.post(f"{base}/_admin/ermeo/expire-access-tokens")
    records.append(await run_once(root, "assets"))
    # The token endpoint refuses a refresh quoting the token; the password login follows.
    refused = expire_stored_access_token(root, "svc").refresh_token
    assert refused is not None
    server.script(
        Reply(400, {"error": "invalid_grant", "error_description": f"token {refused} is used"})
    )
    records.append(await run_once(root, "data"))
    # And a run that fails inside the token exchange.
    expire_stored_access_token(root, "svc")
    server.script(*[Reply(503, {"error": "down", "error_description": refused}) for _ in range(3)])
    records.append(await run_once(root, "data"))
    assert [r.status for r in records] == ["succeeded"] * 6 + ["failed"], [r.error for r in records]
    echoed = records[1].steps[0].response
    assert echoed is not None and echoed["body"]["headers"]["authorization"] == "Bearer ***"

    secrets = sandbox_tokens(sandbox) | set(TS_SECRETS.values())
    for body in server.issued:
        secrets |= {body["access_token"], body["refresh_token"]}
    secrets.discard(TS_SECRETS["FRT_TS_USERNAME"])
    secrets.discard(SANDBOX_SECRETS["FRT_ERMEO_USERNAME"])
    assert len(secrets) > 15
    logged = "\n".join(
        [caplog.text]
        + [r.getMessage() for r in caplog.records]
        + [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    )
    recorded = "\n".join(repr(r) for r in records)
    raw = state_bytes(root)
    leaks = [f"log: {v}" for v in secrets if v in logged]
    leaks += [f"run record: {v}" for v in secrets if v in recorded]
    leaks += [f"database: {v}" for v in secrets if v.encode() in raw]
    assert leaks == []


# ---------------------------------------------------------------- allowed hosts


@pytest.mark.parametrize("kind", ["oauth2", "api_key"])
async def test_a_redirect_to_a_foreign_host_drops_the_credential(
    server: TokenServer, make_project: ProjectFactory, kind: str
) -> None:
    """A response redirecting to a host outside ``allowed_hosts`` is followed without the
    credential: neither the Authorization header nor the profile's own headers arrive."""
    foreign = server.base_url.replace("127.0.0.1", "localhost") + "/echo"
    profile = (
        ts_profile(
            server.base_url,
            extra="allowed_hosts: [127.0.0.1]\ncapture: {ticket: $.ticket}\n"
            "headers: {Authorization: 'Bearer ${{ token.access_token }}', "
            "X-Ticket: '${{ token.ticket }}'}",
        )
        if kind == "oauth2"
        else f"""
            name: svc
            kind: api_key
            base_url: {server.base_url}/api
            allowed_hosts: [127.0.0.1]
            headers: {{X-Api-Key: "${{{{ secrets.FRT_TS_CLIENT_SECRET }}}}"}}
            """
    )
    server.extra = {"ticket": "ticket-7d1e55aa"}
    root = make_project({"f": get_flow("f", "svc", f"redirect?to={foreign}")}, {"svc": profile})
    write_env(root, TS_SECRETS)
    record = await run_once(root, "f")
    assert record.status == "succeeded", record.error
    (first,) = server.api_calls
    sent = "authorization" if kind == "oauth2" else "x-api-key"
    assert sent in first
    (arrived,) = server.echoes
    for header in ("authorization", "x-ticket", "x-api-key"):
        assert header not in arrived["headers"], arrived["headers"]


async def test_a_url_outside_allowed_hosts_fails_before_sending(
    server: TokenServer, make_project: ProjectFactory
) -> None:
    """A step that would send the profile's credential to a host outside its
    ``allowed_hosts`` fails before anything is sent, token request included."""
    foreign = server.base_url.replace("127.0.0.1", "localhost") + "/echo"
    root = make_project(
        {"f": get_flow("f", "svc", foreign)},
        {"svc": ts_profile(server.base_url, extra="allowed_hosts: [127.0.0.1]")},
    )
    write_env(root, TS_SECRETS)
    record = await run_once(root, "f")
    assert record.status == "failed"
    assert record.error is not None
    assert "may only send its credential to 127.0.0.1" in record.error
    assert "localhost" in record.error
    assert server.echoes == [] and server.calls == []
