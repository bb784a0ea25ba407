"""A process killed (SIGKILL) in the middle of a token refresh: on restart no refresh token
is presented twice and the next run succeeds."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_auth_support import (
    ERMEO_TOKEN,
    SANDBOX_SECRETS,
    Sandbox,
    ermeo_profile,
    expire_stored_access_token,
    get_flow,
    load_credential,
    run_child,
    run_once,
    write_env,
)

from flowrunner.auth.tokens import LEASE_LENGTH

ProjectFactory = Callable[..., Path]


@pytest.fixture
async def root(make_project: ProjectFactory, sandbox: Sandbox) -> Path:
    """A project whose Ermeo profile logged in once and whose access token has expired."""
    project = make_project(
        {"assets": get_flow("assets", "ermeo", "assets?site=HQ")},
        {"ermeo": ermeo_profile(sandbox.base_url)},
    )
    write_env(project, SANDBOX_SECRETS)
    assert (await run_once(project, "assets")).status == "succeeded"
    expire_stored_access_token(project, "ermeo")
    return project


async def test_killed_after_the_token_answer_before_the_commit(
    root: Path, sandbox: Sandbox
) -> None:
    """Killed with the rotated tokens received but not stored: the refresh token it sent
    was marked spent before sending, so the restarted runner never presents it again and
    logs in with the password instead, without waiting for the dead process's lease to
    run out; the run succeeds."""
    before = load_credential(root, "ermeo")
    assert before is not None
    code, result, err = run_child(root, "assets", KILL_AT="after_response")
    assert code == -signal.SIGKILL, err
    assert result is None
    assert sandbox.requests(ERMEO_TOKEN) == 2  # the login, the refresh that was lost
    left = load_credential(root, "ermeo")
    assert left is not None
    assert left.refresh_token == before.refresh_token and left.refresh_token_spent

    started = time.monotonic()
    record = await run_once(root, "assets")
    assert record.status == "succeeded", record.error
    assert time.monotonic() - started < LEASE_LENGTH.total_seconds() / 4
    assert sandbox.requests(ERMEO_TOKEN) == 3  # ... and the password login
    assert sandbox.reuses == 0
    after = load_credential(root, "ermeo")
    assert after is not None and after.status == "ok"
    assert after.refresh_token != before.refresh_token and not after.refresh_token_spent


async def test_killed_right_after_the_commit(root: Path, sandbox: Sandbox) -> None:
    """Killed right after the rotated tokens were committed: the restarted runner uses the
    stored access token without a token call, and later refreshes with the stored refresh
    token, which the server accepts as never used."""
    before = load_credential(root, "ermeo")
    assert before is not None
    code, result, err = run_child(root, "assets", KILL_AT="after_commit")
    assert code == -signal.SIGKILL, err
    assert result is None
    committed = load_credential(root, "ermeo")
    assert committed is not None and not committed.refresh_token_spent
    assert committed.refresh_token != before.refresh_token

    record = await run_once(root, "assets")
    assert record.status == "succeeded", record.error
    assert sandbox.requests(ERMEO_TOKEN) == 2  # the login and the committed refresh
    expire_stored_access_token(root, "ermeo")
    record = await run_once(root, "assets")
    assert record.status == "succeeded", record.error
    assert sandbox.requests(ERMEO_TOKEN) == 3
    assert sandbox.reuses == 0
    final = load_credential(root, "ermeo")
    assert final is not None and final.refresh_token not in (
        before.refresh_token,
        committed.refresh_token,
    )
