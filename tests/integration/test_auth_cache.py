"""What a runtime keeps between requests of a profile (a bearer profile's auth, an oauth2
profile's token source, the status upkeep) is never stale: a token changed in the
environment, stored with set-token, refused, refreshed or due for refresh, and a
profile changed by a reload, count from the next request; every run's masker still
learns the token; the status is still written when it changes."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from multidict import CIMultiDict
from test_auth_support import (
    TS_SECRETS,
    ClientClock,
    Sandbox,
    TokenServer,
    get_flow,
    load_credential,
    make_jwt,
    runtime_for,
    ts_profile,
    write_env,
)
from yarl import URL

import flowrunner.auth.provider as provider_module
from flowrunner.app import Runtime
from flowrunner.auth.errors import TokenRejected
from flowrunner.loader import load_project
from flowrunner.model import BearerProfile
from flowrunner.runtime import StepFailed
from flowrunner.store.runs import RunRecord
from flowrunner.wire import WireAuth, WireRequest, WireResponse, send_with_auth

ProjectFactory = Callable[..., Path]
ADMIN = {"X-Admin-Key": "iobeya-demo-admin"}
BOARDS = "GET /iobeya/s/api/boards"


def bearer_profile(base: str, extra: str = "") -> str:
    return (
        "name: bot\n"
        "kind: bearer\n"
        "token: ${{ secrets.FRT_BOT_TOKEN }}\n"
        f"base_url: {base}\n" + extra
    )


@pytest.fixture
def bearer_project(
    make_project: ProjectFactory, server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Flow ``echo`` calls the TokenServer's /echo through bearer profile ``bot``."""
    monkeypatch.setenv("FRT_BOT_TOKEN", "opaque-configured-1111")
    return make_project(
        {"echo": get_flow("echo", "bot", "echo")},
        {"bot": bearer_profile(server.base_url)},
    )


@pytest.fixture
def oauth2_project(make_project: ProjectFactory, server: TokenServer) -> Path:
    """Flow ``echo`` calls /echo and flow ``data`` calls /api/data through oauth2
    profile ``svc`` (a password grant at the TokenServer)."""
    root = make_project(
        {
            "echo": get_flow("echo", "svc", f"{server.base_url}/echo"),
            "data": get_flow("data", "svc", "data"),
        },
        {"svc": ts_profile(server.base_url, extra="allowed_hosts: [127.0.0.1]")},
    )
    write_env(root, TS_SECRETS)
    return root


async def run(runtime: Runtime, flow: str) -> RunRecord:
    return await runtime.engine.run(flow, trigger={})


async def succeed(runtime: Runtime, flow: str) -> RunRecord:
    record = await run(runtime, flow)
    assert record.status == "succeeded", record.error
    return record


def sent_authorizations(server: TokenServer) -> list[str]:
    return [seen["headers"].get("authorization", "") for seen in server.echoes]


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("kind", ["bearer", "oauth2"])
async def test_every_run_masks_the_token_its_requests_carry(
    kind: str, request: pytest.FixtureRequest, server: TokenServer
) -> None:
    """The token is applied from what the runtime keeps, yet each run's record masks it:
    the API echoing the Authorization header reads ``Bearer ***`` in every run."""
    root: Path = request.getfixturevalue(f"{kind}_project")
    async with runtime_for(root) as runtime:
        records = [await succeed(runtime, "echo") for _ in range(3)]
    tokens = {value.partition(" ")[2] for value in sent_authorizations(server)}
    (token,) = tokens
    for record in records:
        response = record.steps[0].response
        assert response is not None
        assert response["body"]["headers"]["authorization"] == "Bearer ***"
        assert token not in repr(record)
    assert server.grants() == ([] if kind == "bearer" else ["password"])


# ---------------------------------------------------------------- bearer tokens


async def test_a_bearer_token_changed_in_the_environment_counts_at_once(
    bearer_project: Path, server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with runtime_for(bearer_project) as runtime:
        await succeed(runtime, "echo")
        monkeypatch.setenv("FRT_BOT_TOKEN", "opaque-configured-2222")
        await succeed(runtime, "echo")
        monkeypatch.delenv("FRT_BOT_TOKEN")
        record = await run(runtime, "echo")
    assert sent_authorizations(server) == [
        "Bearer opaque-configured-1111",
        "Bearer opaque-configured-2222",
    ]
    assert record.status == "failed"
    assert record.error is not None and "has no token" in record.error


async def test_a_token_stored_with_set_token_replaces_the_one_in_use(
    bearer_project: Path, server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set-token in the same process counts from the next request; set-token from another
    process once the stored token is read again (every few seconds), whoever reads it."""
    monkeypatch.setattr(provider_module, "BEARER_REREAD_SECONDS", 3600.0)
    async with runtime_for(bearer_project) as runtime:
        profile = runtime.auth.profile("bot")
        assert isinstance(profile, BearerProfile)
        await succeed(runtime, "echo")
        runtime.auth.set_bearer_token(profile, "opaque-set-here-3333")
        await succeed(runtime, "echo")

        async with runtime_for(bearer_project) as other:  # another process
            other.auth.set_bearer_token(profile, "opaque-set-elsewhere-4444")
        await succeed(runtime, "echo")  # not read again yet
        # The stored token read again, here by the profiles' status (what serve's
        # housekeeping does): the next request carries it.
        monkeypatch.setattr(provider_module, "BEARER_REREAD_SECONDS", 0.0)
        assert runtime.auth.bearer_token(profile)[0] == "opaque-set-elsewhere-4444"
        monkeypatch.setattr(provider_module, "BEARER_REREAD_SECONDS", 3600.0)
        await succeed(runtime, "echo")

        async with runtime_for(bearer_project) as other:
            other.auth.set_bearer_token(profile, "opaque-set-elsewhere-5555")
        monkeypatch.setattr(provider_module, "BEARER_REREAD_SECONDS", 0.0)
        await succeed(runtime, "echo")  # read again by the request itself
    assert sent_authorizations(server) == [
        "Bearer opaque-configured-1111",
        "Bearer opaque-set-here-3333",
        "Bearer opaque-set-here-3333",
        "Bearer opaque-set-elsewhere-4444",
        "Bearer opaque-set-elsewhere-5555",
    ]


async def issue(sandbox: Sandbox, days: int) -> str:
    async with httpx.AsyncClient(base_url=sandbox.base_url, headers=ADMIN) as client:
        answer = await client.post(
            "/iobeya/admin/machine-users/bot/tokens", json={"validity_days": days}
        )
        assert answer.status_code == 201, answer.text
        token: str = answer.json()["token"]
        return token


@pytest.mark.parametrize("replaced_by", ["set-token", "environment"])
async def test_a_revoked_token_is_never_sent_again_by_the_runtime_that_saw_the_401(
    replaced_by: str,
    make_project: ProjectFactory,
    sandbox: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the 401 the same runtime sends nothing with the revoked token (the profile is
    rejected) until a new one is stored with set-token or put in the environment; the
    next request carries it and the profile is ok again."""
    revoked = await issue(sandbox, 365)
    root = make_project(
        {"boards": get_flow("boards", "iobeya", "boards")},
        {
            "iobeya": "name: iobeya\nkind: bearer\ntoken: ${{ secrets.FRT_IOBEYA_TOKEN }}\n"
            f"base_url: {sandbox.base_url}/iobeya/s/api\n"
        },
    )
    write_env(root, {"FRT_IOBEYA_TOKEN": revoked})
    async with runtime_for(root) as runtime:
        await succeed(runtime, "boards")
        async with httpx.AsyncClient(base_url=sandbox.base_url, headers=ADMIN) as client:
            answer = await client.post("/iobeya/admin/tokens/revoke", json={"token": revoked})
            assert answer.status_code == 200, answer.text
        refused = await run(runtime, "boards")
        assert refused.status == "failed"
        assert refused.error is not None and "revoked" in refused.error
        sent = sandbox.requests(BOARDS)
        again = await run(runtime, "boards")
        assert again.status == "failed"
        assert again.error is not None and "refused with 401 (revoked)" in again.error
        assert sandbox.requests(BOARDS) == sent

        profile = runtime.auth.profile("iobeya")
        assert isinstance(profile, BearerProfile)
        replacement = await issue(sandbox, 90)
        if replaced_by == "set-token":
            runtime.auth.set_bearer_token(profile, replacement)
        else:
            monkeypatch.setenv("FRT_IOBEYA_TOKEN", replacement)
        await succeed(runtime, "boards")
    assert sandbox.requests(BOARDS) == sent + 1
    stored = load_credential(root, "iobeya")
    assert stored is not None and stored.status == "ok"


async def test_an_expiry_passed_while_the_auth_is_kept_is_checked_before_sending(
    make_project: ProjectFactory, server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JWT's expiry is compared on every request, not when the auth was built."""
    clock = ClientClock()
    now = clock()
    token = make_jwt({"sub": "bot", "exp": int((now + timedelta(hours=1)).timestamp())})
    monkeypatch.setenv("FRT_BOT_TOKEN", token)
    root = make_project(
        {"echo": get_flow("echo", "bot", "echo")}, {"bot": bearer_profile(server.base_url)}
    )
    async with runtime_for(root, clock) as runtime:
        await succeed(runtime, "echo")
        clock.offset = timedelta(hours=2)
        record = await run(runtime, "echo")
    assert record.status == "failed"
    assert record.error is not None and "expired" in record.error
    assert len(server.echoes) == 1


async def test_an_expiry_passed_while_the_auth_is_kept_is_checked_on_the_system_clock(
    make_project: ProjectFactory, server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    expires = math.ceil(time.time()) + 1
    monkeypatch.setenv("FRT_BOT_TOKEN", make_jwt({"sub": "bot", "exp": expires}))
    root = make_project(
        {"echo": get_flow("echo", "bot", "echo")}, {"bot": bearer_profile(server.base_url)}
    )
    async with runtime_for(root) as runtime:
        await succeed(runtime, "echo")
        await asyncio.sleep(expires - time.time() + 0.05)
        record = await run(runtime, "echo")
    assert record.status == "failed"
    assert record.error is not None and "expired" in record.error
    assert len(server.echoes) == 1


# ---------------------------------------------------------------- oauth2 tokens


async def test_a_token_refreshed_after_a_401_is_the_one_sent_and_masked_next(
    oauth2_project: Path, server: TokenServer
) -> None:
    async with runtime_for(oauth2_project) as runtime:
        await succeed(runtime, "data")
        server.access.clear()  # the API now refuses the token
        await succeed(runtime, "data")
        await succeed(runtime, "data")
        echoed = await succeed(runtime, "echo")
    assert server.grants() == ["password", "refresh_token"]
    assert server.api_statuses == [200, 401, 200, 200]
    first, refused, resent, last = (call["authorization"] for call in server.api_calls)
    assert refused == first
    assert resent == last != first
    fresh = server.issued[-1]["access_token"]
    assert last == f"Bearer {fresh}"
    assert sent_authorizations(server) == [last]
    response = echoed.steps[0].response
    assert response is not None
    assert response["body"]["headers"]["authorization"] == "Bearer ***"
    assert fresh not in repr(echoed)


async def test_a_token_due_for_refresh_is_refreshed_before_sending_on_the_system_clock(
    oauth2_project: Path, server: TokenServer
) -> None:
    """A token that lives 2 s (32 s minus 30 s of clock skew) is refreshed ahead of its
    expiry (half its life, here) although the runtime keeps it: never sent once due."""
    server.expires_in = 32
    async with runtime_for(oauth2_project) as runtime:
        await succeed(runtime, "data")
        await succeed(runtime, "data")
        assert server.grants() == ["password"]
        await asyncio.sleep(1.2)
        await succeed(runtime, "data")
    assert server.grants() == ["password", "refresh_token"]
    assert server.api_statuses == [200, 200, 200]
    assert server.api_calls[-1]["authorization"] == f"Bearer {server.issued[-1]['access_token']}"


async def test_a_token_due_for_refresh_is_refreshed_before_sending_on_an_injected_clock(
    oauth2_project: Path, server: TokenServer
) -> None:
    clock = ClientClock()
    async with runtime_for(oauth2_project, clock) as runtime:
        await succeed(runtime, "data")
        clock.offset = timedelta(minutes=50)  # the 5-minute margin is still ahead
        await succeed(runtime, "data")
        assert server.grants() == ["password"]
        clock.offset = timedelta(minutes=56)  # inside it: 59.5 minutes of life, less 5
        await succeed(runtime, "data")
    assert server.grants() == ["password", "refresh_token"]
    assert server.api_statuses == [200, 200, 200]


async def test_a_token_forgotten_by_the_token_manager_is_obtained_again(
    oauth2_project: Path, server: TokenServer
) -> None:
    async with runtime_for(oauth2_project) as runtime:
        await succeed(runtime, "data")
        runtime.auth.tokens.forget("svc")
        stored = load_credential(oauth2_project, "svc")
        assert stored is not None
        await succeed(runtime, "data")  # read back from the store: no token call
        assert server.grants() == ["password"]
    calls = [call["authorization"] for call in server.api_calls]
    assert calls == [f"Bearer {stored.access_token}"] * 2


# ---------------------------------------------------------------- reloads


def reload(runtime: Runtime, root: Path) -> None:
    """What ``flowrunner serve`` does with a changed project."""
    project = load_project(root)
    assert project.problems == []
    runtime.project = project
    runtime.engine.project = project
    runtime.auth.project = project


async def test_a_reloaded_bearer_profile_applies_its_new_version(
    bearer_project: Path, server: TokenServer
) -> None:
    async with runtime_for(bearer_project) as runtime:
        await succeed(runtime, "echo")
        (bearer_project / "auth_profiles" / "bot.yaml").write_text(
            bearer_profile(server.base_url, "header: X-Api-Token\nscheme: Token\n")
        )
        reload(runtime, bearer_project)
        await succeed(runtime, "echo")
        (bearer_project / "auth_profiles" / "bot.yaml").unlink()
        runtime.auth.project = load_project(bearer_project)  # flow echo is now invalid
        with pytest.raises(StepFailed, match="not loaded"):
            await runtime.auth.auth_for("bot", runtime_run_context(runtime))
    first, second = server.echoes
    assert first["headers"]["authorization"] == "Bearer opaque-configured-1111"
    assert "authorization" not in second["headers"]
    assert second["headers"]["x-api-token"] == "Token opaque-configured-1111"


async def test_a_reloaded_oauth2_profile_applies_its_new_headers(
    oauth2_project: Path, server: TokenServer
) -> None:
    async with runtime_for(oauth2_project) as runtime:
        await succeed(runtime, "echo")
        text = ts_profile(
            server.base_url,
            extra='allowed_hosts: [127.0.0.1]\nheaders: {X-Access: "${{ token.access_token }}"}',
        )
        (oauth2_project / "auth_profiles" / "svc.yaml").write_text(text)
        reload(runtime, oauth2_project)
        await succeed(runtime, "echo")
    first, second = server.echoes
    token = server.issued[-1]["access_token"]
    assert first["headers"]["authorization"] == f"Bearer {token}"
    assert "authorization" not in second["headers"]
    assert second["headers"]["x-access"] == token


def runtime_run_context(runtime: Runtime) -> Any:
    from datetime import UTC, datetime

    from flowrunner.runtime import RunContext
    from flowrunner.secrets import Masker

    async def nothing(*_args: Any) -> Any:
        return None

    return RunContext(
        run_id="test",
        flow_name="test",
        started_at=datetime.now(UTC),
        masker=Masker(),
        client=runtime.client,
        wire=runtime.wire,
        auth=runtime.auth,
        run_steps=nothing,
        call_flow=nothing,
    )


# ---------------------------------------------------------------- status upkeep


async def test_the_status_is_written_when_it_changes_and_last_use_once_a_minute(
    make_project: ProjectFactory, server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Successes in a row write nothing after the first use; a 403 writes ``forbidden``,
    the next success ``ok``, each once."""
    writer = make_jwt({"sub": "bot", "roles": ["orders:write"]})
    reader = make_jwt({"sub": "bot", "roles": ["orders:read"]})
    monkeypatch.setenv("FRT_BOT_TOKEN", writer)
    root = make_project(
        {
            "order": """
                name: order
                steps:
                  - id: create
                    http: {method: POST, url: orders, auth: bot, json: {item: 1}}
                """
        },
        {"bot": bearer_profile(f"{server.base_url}/api")},
    )
    async with runtime_for(root) as runtime:
        store = runtime.auth.store
        statuses: list[str] = []
        touches: list[str] = []
        set_status, touch = store.set_status, store.touch

        def record_status(profile: str, status: str, error: str | None = None) -> None:
            statuses.append(status)
            set_status(profile, status, error)

        def record_touch(profile: str, when: Any) -> None:
            touches.append(profile)
            touch(profile, when)

        monkeypatch.setattr(store, "set_status", record_status)
        monkeypatch.setattr(store, "touch", record_touch)
        for _ in range(3):
            await succeed(runtime, "order")
        assert (statuses, touches) == ([], ["bot"])

        monkeypatch.setenv("FRT_BOT_TOKEN", reader)
        assert (await run(runtime, "order")).status == "failed"
        assert (await run(runtime, "order")).status == "failed"
        assert statuses == ["forbidden"]
        stored = load_credential(root, "bot")
        assert stored is not None and stored.status == "forbidden"

        monkeypatch.setenv("FRT_BOT_TOKEN", writer)
        for _ in range(3):
            await succeed(runtime, "order")
        assert statuses == ["forbidden", "ok"]
        assert touches == ["bot"]
    stored = load_credential(root, "bot")
    assert stored is not None and stored.status == "ok"


# ---------------------------------------------------------------- auths written as flows


class RetryWithToken(WireAuth):
    """An auth written as an async generator flow: sends without a credential, and on 401
    adds one and resends once."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.closed = False

    async def auth_flow(self, request: WireRequest) -> AsyncGenerator[WireRequest, WireResponse]:
        try:
            response = yield request
            if response.status_code == 401:
                request.headers["Authorization"] = f"Bearer {self.token}"
                response = yield request
            if response.status_code != 200:
                raise TokenRejected("flow", f"answered {response.status_code}")
        finally:
            self.closed = True


async def test_an_auth_written_as_a_flow_is_driven_by_send_with_auth(
    oauth2_project: Path, server: TokenServer
) -> None:
    async with runtime_for(oauth2_project) as runtime:
        await succeed(runtime, "data")
        token = server.issued[-1]["access_token"]
        url = URL(f"{server.base_url}/api/data")
        auth = RetryWithToken(token)
        request = WireRequest("GET", url, CIMultiDict())
        response = await send_with_auth(runtime.wire, request, auth, 1 << 20)
        assert response.status_code == 200 and auth.closed

        server.access.clear()
        failing = RetryWithToken(token)
        with pytest.raises(TokenRejected, match="answered 401"):
            request = WireRequest("GET", url, CIMultiDict())
            await send_with_auth(runtime.wire, request, failing, 1 << 20)
        assert failing.closed
    assert server.api_statuses == [200, 401, 200, 401, 401]
