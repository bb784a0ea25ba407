"""bearer profiles (iObeya machine users): expiry read from the JWT, revocation turning the
profile ``rejected`` until an administrator stores a new token with ``set-token``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_auth_support import (
    Sandbox,
    get_flow,
    make_jwt,
    profile_state,
    run_once,
    start_token_server,
    write_env,
)
from typer.testing import CliRunner

from flowrunner.cli import app

ProjectFactory = Callable[..., Path]
ADMIN = {"X-Admin-Key": "iobeya-demo-admin"}
BOARDS = "GET /iobeya/s/api/boards"


def iobeya_profile(base: str, extra: str = "") -> str:
    return (
        "name: iobeya\n"
        "kind: bearer\n"
        "token: ${{ secrets.FRT_IOBEYA_TOKEN }}\n"
        f"base_url: {base}/iobeya/s/api\n"
        "allowed_hosts: [127.0.0.1]\n"
        "regenerate_every: 365d\n"
        "owner: it-admins@acme.example\n" + extra
    )


@pytest.fixture
def project(make_project: ProjectFactory, sandbox: Sandbox) -> Callable[..., Path]:
    """A project with flow ``boards`` reading iObeya's boards through profile ``iobeya``."""

    def make(token: str, extra: str = "") -> Path:
        root = make_project(
            {"boards": get_flow("boards", "iobeya", "boards")},
            {"iobeya": iobeya_profile(sandbox.base_url, extra)},
        )
        write_env(root, {"FRT_IOBEYA_TOKEN": token})
        return root

    return make


async def issue(sandbox: Sandbox, **validity: Any) -> str:
    """A machine-user token from the iObeya administration."""
    async with httpx.AsyncClient(base_url=sandbox.base_url, headers=ADMIN) as client:
        answer = await client.post("/iobeya/admin/machine-users/bot/tokens", json=validity)
        assert answer.status_code == 201, answer.text
        token: str = answer.json()["token"]
        return token


async def revoke(sandbox: Sandbox, token: str) -> None:
    async with httpx.AsyncClient(base_url=sandbox.base_url, headers=ADMIN) as client:
        answer = await client.post("/iobeya/admin/tokens/revoke", json={"token": token})
        assert answer.status_code == 200, answer.text


async def set_token(root: Path, text: str) -> str:
    """``flowrunner profiles set-token iobeya`` with ``text`` on standard input."""

    def invoke() -> str:
        result = CliRunner().invoke(
            app, ["profiles", "set-token", "iobeya", "--project", str(root)], input=text
        )
        assert result.exit_code == 0, result.output
        return result.output

    return await asyncio.to_thread(invoke)


async def test_a_revoked_token_fails_the_run_and_stays_rejected_until_set_token(
    sandbox: Sandbox, project: Callable[..., Path]
) -> None:
    """A token refused with 401 before its expiry fails the run with a message saying it
    was revoked and what an administrator must do; the profile is ``rejected`` (across a
    restart, sending nothing) until ``set-token`` stores a new token, even one that expires
    sooner than the revoked one, after which runs succeed."""
    revoked = await issue(sandbox, validity_days=365)
    root = project(revoked)
    assert (await run_once(root, "boards")).status == "succeeded"
    await revoke(sandbox, revoked)

    record = await run_once(root, "boards")
    assert record.status == "failed"
    assert record.error is not None
    assert "auth profile 'iobeya'" in record.error and "revoked" in record.error
    assert "administrator" in record.error
    assert "flowrunner profiles set-token iobeya" in record.error
    assert revoked not in record.error
    assert (await profile_state(root, "iobeya")).status == "rejected"

    sent = sandbox.requests(BOARDS)
    again = await run_once(root, "boards")  # a restart: a new runtime
    assert again.status == "failed"
    assert again.error is not None and "revoked" in again.error
    assert sandbox.requests(BOARDS) == sent
    assert (await profile_state(root, "iobeya")).status == "rejected"

    replacement = await issue(sandbox, validity_days=90)
    output = await set_token(root, replacement + "\n")
    assert replacement not in output
    state = await profile_state(root, "iobeya")
    assert state.status == "ok"
    record = await run_once(root, "boards")
    assert record.status == "succeeded", record.error
    assert (await profile_state(root, "iobeya")).status == "ok"


async def test_an_expired_jwt_is_refused_before_sending(
    sandbox: Sandbox, project: Callable[..., Path]
) -> None:
    """A JWT whose ``exp`` has passed fails the run before any request is sent, with a
    message saying when it expired and what an administrator must do."""
    now = int(datetime.now(UTC).timestamp())
    token = make_jwt({"sub": "bot", "iat": now - 86400, "exp": now - 60})
    root = project(token)
    record = await run_once(root, "boards")
    assert record.status == "failed"
    assert record.error is not None
    assert "expired" in record.error and "set-token iobeya" in record.error
    assert sandbox.requests(BOARDS) == 0
    assert (await profile_state(root, "iobeya")).status == "expired"


async def test_expiry_comes_from_the_jwt_else_from_expires_at(
    project: Callable[..., Path],
) -> None:
    """The expiry is the JWT's ``exp`` (read without verifying the signature), else the
    profile's ``expires_at``; ``regenerate_by`` is the token's ``iat`` plus
    ``regenerate_every``."""
    issued = datetime.now(UTC).replace(microsecond=0) - timedelta(days=10)
    exp = issued + timedelta(days=400)
    token = make_jwt({"sub": "bot", "iat": int(issued.timestamp()), "exp": int(exp.timestamp())})
    state = await profile_state(project(token, "expires_at: 2031-01-01T00:00:00Z\n"), "iobeya")
    assert state.expires_at == exp
    assert state.regenerate_by == issued + timedelta(days=365)
    assert state.status == "ok"

    opaque = await profile_state(
        project("opaque-token-0123456789", "expires_at: 2031-01-01\n"), "iobeya"
    )
    assert opaque.expires_at == datetime(2031, 1, 1, tzinfo=UTC)


async def test_a_token_set_with_set_token_replaces_a_configured_opaque_token(
    make_project: ProjectFactory,
) -> None:
    """With opaque tokens (no expiry to compare), the one stored with ``set-token`` is the
    one sent, not the older one still in the secrets."""
    with start_token_server() as server:
        root = make_project(
            {"echo": get_flow("echo", "iobeya", "echo")},
            {
                "iobeya": "name: iobeya\nkind: bearer\n"
                "token: ${{ secrets.FRT_IOBEYA_TOKEN }}\n"
                f"base_url: {server.base_url}\n"
            },
        )
        write_env(root, {"FRT_IOBEYA_TOKEN": "opaque-configured-7d2c"})
        await set_token(root, '{"token": "opaque-regenerated-41aa"}')
        record = await run_once(root, "echo")
        assert record.status == "succeeded", record.error
        (seen,) = server.echoes
        assert seen["headers"]["authorization"] == "Bearer opaque-regenerated-41aa"
