"""One refresh at a time per profile: concurrent runs in one process, two OS processes on
one state database, and runs that find the token rotated by someone else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from test_auth_support import (
    ERMEO_ASSETS,
    ERMEO_TOKEN,
    SANDBOX_SECRETS,
    TS_SECRETS,
    Sandbox,
    ermeo_profile,
    expire_stored_access_token,
    finish_child,
    get_flow,
    load_credential,
    profile_state,
    run_once,
    runtime_for,
    start_child,
    start_token_server,
    ts_profile,
    write_env,
)

from flowrunner.sandbox.state import Fault

ProjectFactory = Callable[..., Path]
RUNS = 20


@pytest.fixture
def root(make_project: ProjectFactory, sandbox: Sandbox) -> Path:
    """A project with flow ``assets`` reading Ermeo's assets through profile ``ermeo``."""
    project = make_project(
        {"assets": get_flow("assets", "ermeo", "assets?site=HQ")},
        {"ermeo": ermeo_profile(sandbox.base_url)},
    )
    write_env(project, SANDBOX_SECRETS)
    return project


def slow_token_endpoint(sandbox: Sandbox, seconds: float = 0.3) -> None:
    """The next token request waits before it is answered, so that the others pile up."""
    sandbox.state.arm_fault(Fault("/ermeo/oauth", delay_seconds=seconds))


async def test_concurrent_runs_make_exactly_one_token_call(root: Path, sandbox: Sandbox) -> None:
    """20 concurrent runs on one oauth2 profile with no token yet make exactly one token
    call, and all of them succeed with that token."""
    slow_token_endpoint(sandbox)
    async with runtime_for(root) as runtime:
        records = await asyncio.gather(
            *[runtime.engine.run("assets", trigger={}) for _ in range(RUNS)]
        )
    assert [r.status for r in records] == ["succeeded"] * RUNS, [r.error for r in records]
    assert sandbox.requests(ERMEO_TOKEN) == 1
    assert sandbox.requests(ERMEO_ASSETS) == RUNS


async def test_concurrent_runs_with_an_expired_token_refresh_once(
    root: Path, sandbox: Sandbox
) -> None:
    """20 concurrent runs that all find the access token expired make exactly one refresh,
    and the single-use refresh token is never presented twice."""
    assert (await run_once(root, "assets")).status == "succeeded"
    expire_stored_access_token(root, "ermeo")
    slow_token_endpoint(sandbox)
    async with runtime_for(root) as runtime:
        records = await asyncio.gather(
            *[runtime.engine.run("assets", trigger={}) for _ in range(RUNS)]
        )
        assert runtime.auth.tokens.refresh_count == 1
    assert [r.status for r in records] == ["succeeded"] * RUNS, [r.error for r in records]
    assert sandbox.requests(ERMEO_TOKEN) == 2  # the login, then one refresh
    assert sandbox.reuses == 0


async def test_two_processes_on_one_store_make_one_refresh_between_them(
    root: Path, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two OS processes sharing one SQLite store, both finding the access token expired at
    the same moment, make exactly one refresh between them; the server sees no reuse of a
    refresh token and both runs succeed."""
    assert (await run_once(root, "assets")).status == "succeeded"
    expire_stored_access_token(root, "ermeo")
    async with httpx.AsyncClient() as client:
        await client.post(f"{sandbox.base_url}/_admin/ermeo/expire-access-tokens")
    slow_token_endpoint(sandbox, 0.5)
    sync = tmp_path_factory.mktemp("sync")
    go = sync / "go"
    children = [
        start_child(root, "assets", READY_FILE=str(sync / f"ready-{n}"), GO_FILE=str(go))
        for n in range(2)
    ]
    deadline = time.monotonic() + 20
    while not all((sync / f"ready-{n}").exists() for n in range(2)):
        assert time.monotonic() < deadline, "the children did not start"
        assert all(child.poll() is None for child in children), [
            finish_child(child) for child in children
        ]
        await asyncio.sleep(0.01)
    go.touch()
    outcomes = [finish_child(child) for child in children]
    for code, result, err in outcomes:
        assert code == 0, err
        assert result is not None and result["status"] == "succeeded", result
    assert sum(result["refreshes"] for _, result, _ in outcomes if result) == 1
    assert sandbox.requests(ERMEO_TOKEN) == 2  # the parent's login, one refresh
    assert sandbox.reuses == 0


async def test_a_run_with_a_stale_token_uses_the_one_another_run_rotated(
    root: Path, sandbox: Sandbox
) -> None:
    """A runtime still holding the access token another runtime has since replaced gets a
    401, finds the rotated token in the shared store, and resends with it: no token call."""
    async with runtime_for(root) as first, runtime_for(root) as second:
        assert (await first.engine.run("assets", trigger={})).status == "succeeded"
        assert (await second.engine.run("assets", trigger={})).status == "succeeded"
        expire_stored_access_token(root, "ermeo")
        async with httpx.AsyncClient() as client:
            await client.post(f"{sandbox.base_url}/_admin/ermeo/expire-access-tokens")
        assert (await first.engine.run("assets", trigger={})).status == "succeeded"
        calls = sandbox.requests(ERMEO_TOKEN)
        record = await second.engine.run("assets", trigger={})
        assert record.status == "succeeded", record.error
        assert sandbox.requests(ERMEO_TOKEN) == calls == 2
        assert second.auth.tokens.refresh_count == 0
    assert sandbox.reuses == 0


async def test_invalid_grant_after_a_rotation_elsewhere_is_not_a_dead_profile(
    root: Path, sandbox: Sandbox
) -> None:
    """When another runner (not sharing this store) already rotated the refresh token, the
    refresh is refused with invalid_grant; the profile logs in again with its password,
    the run succeeds and the status stays ``ok``."""
    assert (await run_once(root, "assets")).status == "succeeded"
    stored = expire_stored_access_token(root, "ermeo")
    async with httpx.AsyncClient() as client:  # the other runner's refresh
        answer = await client.post(
            f"{sandbox.base_url}/ermeo/oauth/v2/token",
            json={
                "grant_type": "refresh_token",
                "refresh_token": stored.refresh_token,
                "client_id": SANDBOX_SECRETS["FRT_ERMEO_CLIENT_ID"],
                "client_secret": SANDBOX_SECRETS["FRT_ERMEO_CLIENT_SECRET"],
            },
        )
        assert answer.status_code == 200
    record = await run_once(root, "assets")
    assert record.status == "succeeded", record.error
    state = await profile_state(root, "ermeo")
    assert state.status == "ok"
    fresh = load_credential(root, "ermeo")
    assert fresh is not None and fresh.refresh_token not in (None, stored.refresh_token)
    assert not fresh.refresh_token_spent
    # login, the other runner's refresh, our refused refresh, our password login
    assert sandbox.requests(ERMEO_TOKEN) == 4


async def test_a_token_shorter_lived_than_the_margin_is_not_refreshed_per_request(
    make_project: ProjectFactory,
) -> None:
    """A token that lives 2 minutes, under the default 5-minute refresh margin, is fetched
    once for 20 concurrent runs and reused by the next 20, not refreshed on every request."""
    with start_token_server() as server:
        server.expires_in = 120
        server.delay = 0.2
        root = make_project(
            {"f": get_flow("f", "svc", "data")}, {"svc": ts_profile(server.base_url)}
        )
        write_env(root, TS_SECRETS)
        async with runtime_for(root) as runtime:
            for _ in range(2):
                records = await asyncio.gather(
                    *[runtime.engine.run("f", trigger={}) for _ in range(RUNS)]
                )
                assert [r.status for r in records] == ["succeeded"] * RUNS
        assert server.grants() == ["password"]
        assert len(server.api_calls) == 2 * RUNS
