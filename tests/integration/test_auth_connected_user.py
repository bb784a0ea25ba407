"""connected_user profiles: calls carry the triggering user's token; a 403 is that user's
missing permission, explained for support, and never answered with a refresh."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_auth_support import (
    ERMEO_TOKEN,
    Sandbox,
    TokenServer,
    make_jwt,
    profile_state,
    run_once,
    start_token_server,
)

ProjectFactory = Callable[..., Path]
WORK_ORDERS = "POST /ermeo/api/v1/work-orders"


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with start_token_server() as token_server:
        yield token_server


def project_for(make_project: ProjectFactory, base_url: str, url: str) -> Path:
    """Flow ``create`` POSTs a work order to ``url`` as the connected user."""
    return make_project(
        {
            "create": f"""
                name: create
                steps:
                  - id: create
                    http:
                      method: POST
                      url: {url}
                      auth: as-user
                      json: {{asset_id: A-001, title: Leaking pump}}
                """
        },
        {
            "as-user": f"""
                name: as-user
                kind: connected_user
                base_url: {base_url}
                allowed_hosts: [127.0.0.1]
                """
        },
    )


async def test_the_connected_user_acts_with_their_own_permissions(
    sandbox: Sandbox, make_project: ProjectFactory
) -> None:
    """Alice's token creates the work order as Alice; Bob's is refused with 403 and the run
    says which method and URL were refused and that support should check the user's roles;
    no token endpoint is called and the request is not retried."""
    root = project_for(make_project, f"{sandbox.base_url}/ermeo/api/v1", "work-orders")
    record = await run_once(root, "create", user_token="Bearer ermeo-user-alice")
    assert record.status == "succeeded", record.error
    assert sandbox.state.ermeo.work_orders["WO-1"]["created_by"] == "alice@acme.example"

    record = await run_once(root, "create", user_token="Bearer ermeo-user-bob")
    assert record.status == "failed"
    assert record.error is not None
    assert f"POST {sandbox.base_url}/ermeo/api/v1/work-orders" in record.error
    assert "403" in record.error and "missing role work_orders:write" in record.error
    assert "roles" in record.error and "by hand" in record.error
    assert "ermeo-user-bob" not in record.error
    assert sandbox.requests(WORK_ORDERS) == 2
    assert sandbox.requests(ERMEO_TOKEN) == 0
    assert (await profile_state(root, "as-user")).status == "forbidden"


async def test_a_403_names_the_user_of_a_jwt(
    server: TokenServer, make_project: ProjectFactory
) -> None:
    """When the user's token is a JWT with an email claim, the 403 message names that user,
    the method and the URL; the token endpoint is never called and nothing is resent."""
    root = project_for(make_project, f"{server.base_url}/api", "orders")
    bob = make_jwt({"sub": "u-42", "email": "bob@acme.example", "roles": ["orders:read"]})
    record = await run_once(root, "create", user_token=f"Bearer {bob}")
    assert record.status == "failed"
    assert record.error is not None
    assert "user bob@acme.example is not allowed to POST" in record.error
    assert f"{server.base_url}/api/orders" in record.error
    assert "check the user's roles" in record.error
    assert bob not in record.error
    assert server.calls == []
    assert len(server.api_calls) == 1

    alice = make_jwt({"sub": "u-7", "email": "alice@acme.example", "roles": ["orders:write"]})
    record = await run_once(root, "create", user_token=f"Bearer {alice}")
    assert record.status == "succeeded", record.error
    assert server.calls == []


async def test_run_user_names_the_user_whose_token_the_run_carries(
    make_project: ProjectFactory,
) -> None:
    """``${{ run.user }}`` and the run's history name the user of a JWT (its email, else
    its other usual claims); an opaque token or no token leaves both empty."""
    root = make_project(
        {
            "whoami": """
                name: whoami
                steps:
                  - id: who
                    set: {user: "${{ run.user }}", known: "${{ run.user is not none }}"}
                """
        }
    )
    alice = make_jwt({"sub": "u-7", "email": "alice@acme.example"})
    record = await run_once(root, "whoami", user_token=f"Bearer {alice}")
    assert record.status == "succeeded", record.error
    assert record.user == "alice@acme.example"
    assert record.steps[0].outputs == {"user": "alice@acme.example", "known": True}
    assert alice not in repr(record)

    for token in ("Bearer opaque-user-token", None):
        record = await run_once(root, "whoami", user_token=token)
        assert record.status == "succeeded", record.error
        assert record.user is None
        assert record.steps[0].outputs == {"user": None, "known": False}
