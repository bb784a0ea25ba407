"""End-to-end behaviour of the local sandbox that stands in for the business APIs."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from flowrunner.sandbox import SandboxSettings, create_app

ERMEO_CLIENT = {"client_id": "ermeo-demo-client", "client_secret": "ermeo-demo-secret"}
ERMEO_PASSWORD_GRANT = {
    **ERMEO_CLIENT,
    "grant_type": "password",
    "username": "svc-flowrunner@acme.example",
    "password": "demo-password",
}
ERMEO_OAUTH = "/ermeo/oauth/v2/token"
ERMEO_ASSETS = "/ermeo/api/v1/assets?site=HQ"
ERMEO_WORK_ORDERS = "/ermeo/api/v1/work-orders"
IOBEYA_ADMIN = {"X-Admin-Key": "iobeya-demo-admin"}
IOBEYA_ISSUE = "/iobeya/admin/machine-users/bot/tokens"
TRIPLETEX_CREATE = "/tripletex/v2/token/session/:create"
TRIPLETEX_KEYS = {
    "consumerToken": "tripletex-demo-consumer",
    "employeeToken": "tripletex-demo-employee",
}
POWEROFFICE_KEY = {"X-API-Key": "poweroffice-demo-key"}
START = 1_750_000_000.0  # 2025-06-15T15:06:40Z


@dataclass
class FakeClock:
    """A settable clock so expiry can be tested without sleeping."""

    now: float = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(SandboxSettings(), clock=clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox.test") as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def ermeo_login(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post(ERMEO_OAUTH, json=ERMEO_PASSWORD_GRANT)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def ermeo_refresh(client: httpx.AsyncClient, refresh_token: str) -> httpx.Response:
    grant = {**ERMEO_CLIENT, "grant_type": "refresh_token", "refresh_token": refresh_token}
    return await client.post(ERMEO_OAUTH, json=grant)


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get("/_admin/stats")).json()
    return body


async def test_ermeo_expires_in_is_a_string(client: httpx.AsyncClient) -> None:
    """The Ermeo password grant returns expires_in as the string "7200", like the real API."""
    body = await ermeo_login(client)
    shape = {key: body[key] for key in ("expires_in", "token_type", "scope")}
    assert shape == {"expires_in": "7200", "token_type": "bearer", "scope": "api"}
    assert body["access_token"] and body["refresh_token"]


async def test_ermeo_rejects_wrong_client_and_wrong_password(client: httpx.AsyncClient) -> None:
    """A wrong client gets 401 invalid_client and a wrong password 400 invalid_grant."""
    bad_client = await client.post(ERMEO_OAUTH, json={**ERMEO_PASSWORD_GRANT, "client_id": "x"})
    bad_password = await client.post(ERMEO_OAUTH, json={**ERMEO_PASSWORD_GRANT, "password": "x"})
    assert (bad_client.status_code, bad_client.json()["error"]) == (401, "invalid_client")
    assert (bad_password.status_code, bad_password.json()["error"]) == (400, "invalid_grant")


async def test_ermeo_refresh_token_is_single_use(client: httpx.AsyncClient) -> None:
    """A refresh token can be redeemed once; reusing it gets invalid_grant and is counted."""
    refresh = (await ermeo_login(client))["refresh_token"]
    first = await ermeo_refresh(client, refresh)
    again = await ermeo_refresh(client, refresh)
    assert first.status_code == 200
    assert first.json()["refresh_token"] != refresh
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")
    assert (await stats(client))["refresh_token_reuses"] == 1


async def test_ermeo_tokens_lapse(client: httpx.AsyncClient, clock: FakeClock) -> None:
    """Access tokens lapse after 7200 s, refresh tokens when the admin view expires them."""
    tokens = await ermeo_login(client)
    clock.now += 7200
    lapsed = await client.get(ERMEO_ASSETS, headers=bearer(tokens["access_token"]))
    assert lapsed.status_code == 401
    assert (await client.post("/_admin/ermeo/expire-refresh-tokens")).json() == {"expired": 1}
    response = await ermeo_refresh(client, tokens["refresh_token"])
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


async def test_ermeo_token_endpoint_refuses_form_body(client: httpx.AsyncClient) -> None:
    """The Ermeo token endpoint answers a form-encoded body with 400 invalid_request about JSON."""
    response = await client.post(ERMEO_OAUTH, data=ERMEO_PASSWORD_GRANT)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "JSON" in response.json()["error_description"]


async def test_ermeo_assets_paginate_until_next_is_null(client: httpx.AsyncClient) -> None:
    """Following absolute `next` links walks all 25 assets of a site in pages of 10."""
    token = (await ermeo_login(client))["access_token"]
    url: str | None = ERMEO_ASSETS
    ids: list[str] = []
    while url is not None:
        page = (await client.get(url, headers=bearer(token))).json()
        assert len(page["data"]) <= 10
        ids += [asset["id"] for asset in page["data"]]
        url = page["next"]
        assert url is None or url.startswith("http://sandbox.test/ermeo/api/v1/assets?")
    assert ids == [f"A-{n:03d}" for n in range(1, 26)]


async def test_ermeo_alice_writes_and_bob_is_forbidden(client: httpx.AsyncClient) -> None:
    """Connected user alice may create a work order; read-only bob gets 403 forbidden."""
    order = {"asset_id": "A-001", "title": "Replace seal"}
    alice = await client.post(ERMEO_WORK_ORDERS, json=order, headers=bearer("ermeo-user-alice"))
    bob = await client.post(ERMEO_WORK_ORDERS, json=order, headers=bearer("ermeo-user-bob"))
    assert alice.status_code == 201
    assert alice.json() == {"id": "WO-1", **order, "created_by": "alice@acme.example"}
    assert bob.status_code == 403
    assert bob.json() == {"error": "forbidden", "message": "missing role work_orders:write"}
    fetched = await client.get(f"{ERMEO_WORK_ORDERS}/WO-1", headers=bearer("ermeo-user-bob"))
    assert fetched.json()["created_by"] == "alice@acme.example"
    unknown = await client.get(ERMEO_ASSETS, headers=bearer("ermeo-user-eve"))
    assert unknown.status_code == 401


async def issue_iobeya_token(client: httpx.AsyncClient, body: dict[str, int]) -> str:
    issued = await client.post(IOBEYA_ISSUE, json=body, headers=IOBEYA_ADMIN)
    assert issued.status_code == 201, issued.text
    token: str = issued.json()["token"]
    return token


async def test_iobeya_token_issued_used_then_revoked(client: httpx.AsyncClient) -> None:
    """An admin-issued iObeya JWT works until revoked, then gets 401 token_revoked."""
    token = await issue_iobeya_token(client, {"validity_days": 30})
    card = await client.post("/iobeya/s/api/cards", json={"title": "Hi"}, headers=bearer(token))
    assert card.status_code == 201
    assert (await client.get("/iobeya/s/api/boards", headers=bearer(token))).status_code == 200
    revoke = {"token": token}
    assert (await client.post("/iobeya/admin/tokens/revoke", json=revoke)).status_code == 401
    revoked = await client.post("/iobeya/admin/tokens/revoke", json=revoke, headers=IOBEYA_ADMIN)
    assert revoked.status_code == 200
    after = await client.get("/iobeya/s/api/cards", headers=bearer(token))
    assert (after.status_code, after.json()["error"]) == (401, "token_revoked")


async def test_iobeya_admin_key_and_validity_range(client: httpx.AsyncClient) -> None:
    """Issuing needs the admin key, and a validity over 365 days is refused with 400."""
    no_key = await client.post(IOBEYA_ISSUE, json={"validity_days": 1})
    too_long = await client.post(IOBEYA_ISSUE, json={"validity_days": 366}, headers=IOBEYA_ADMIN)
    assert (no_key.status_code, too_long.status_code) == (401, 400)


async def test_iobeya_token_expires(client: httpx.AsyncClient, clock: FakeClock) -> None:
    """A token issued with validity_seconds=1 gets 401 token_expired once the clock moves on."""
    token = await issue_iobeya_token(client, {"validity_seconds": 1})
    assert (await client.get("/iobeya/s/api/boards", headers=bearer(token))).status_code == 200
    clock.now += 2
    expired = await client.get("/iobeya/s/api/boards", headers=bearer(token))
    assert (expired.status_code, expired.json()["error"]) == (401, "token_expired")


async def test_iobeya_bootstrap_token_is_valid_for_a_year(client: httpx.AsyncClient) -> None:
    """The start-up token for flowrunner-bot, exposed by the admin view, is accepted."""
    bootstrap = (await client.get("/_admin/iobeya/bootstrap-token")).json()
    assert bootstrap["user"] == "flowrunner-bot"
    assert bootstrap["expires_at"].startswith("2026-06-15")
    boards = await client.get("/iobeya/s/api/boards", headers=bearer(bootstrap["token"]))
    assert boards.status_code == 200 and boards.json()


def basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


async def test_tripletex_session_as_basic_auth(client: httpx.AsyncClient) -> None:
    """A Tripletex session created with the demo tokens works as Basic 0:token; others get 401."""
    params = {**TRIPLETEX_KEYS, "expirationDate": "2025-06-16"}
    created = await client.put(TRIPLETEX_CREATE, params=params)
    assert created.status_code == 200
    session = created.json()["value"]
    assert session["expirationDate"] == "2025-06-16"
    window = {"invoiceDateFrom": "2025-06-01", "invoiceDateTo": "2025-06-16"}
    url = "/tripletex/v2/invoice"
    invoices = await client.get(url, params=window, headers=basic("0", session["token"]))
    body = invoices.json()
    assert body["fullResultSize"] == len(body["values"]) == 5
    assert {"id", "invoiceNumber", "amount", "customer"} <= body["values"][0].keys()
    assert (await client.get(url, params=window, headers=basic("0", "bad"))).status_code == 401
    wrong = await client.put(TRIPLETEX_CREATE, params={**params, "employeeToken": "x"})
    assert wrong.status_code == 401


async def test_superoffice_requires_matching_so_ticket(client: httpx.AsyncClient) -> None:
    """SuperOffice calls need the SO-Ticket of the access token, and no refresh token is sent."""
    form = {
        "grant_type": "refresh_token",
        "refresh_token": "superoffice-demo-refresh",
        "client_id": "superoffice-demo-client",
        "client_secret": "superoffice-demo-secret",
    }
    tokens = (await client.post("/superoffice/login/common/oauth/tokens", data=form)).json()
    assert tokens["expires_in"] == 3600 and tokens["so_ticket"].startswith("7T:")
    assert "refresh_token" not in tokens
    headers = bearer(tokens["access_token"])
    missing = await client.get("/superoffice/api/v1/Contact", headers=headers)
    assert missing.status_code == 401
    assert "SO-Ticket" in missing.json()["error_description"]
    headers["SO-Ticket"] = tokens["so_ticket"]
    ok = await client.get("/superoffice/api/v1/Contact", headers=headers)
    assert ok.status_code == 200 and ok.json()["value"]


async def test_webcrm_login_and_rotating_refresh(client: httpx.AsyncClient) -> None:
    """webCRM login gives a usable JWT; each refresh token rotates and works only once."""
    login = await client.post("/webcrm/Auth/ApiLogin", params={"authCode": "webcrm-demo-apptoken"})
    first = login.json()
    assert (first["ExpiresIn"], first["TokenType"]) == (3600, "Bearer")
    refresh = {"refreshToken": first["RefreshToken"]}
    second = (await client.post("/webcrm/Auth/ApiRefresh", json=refresh)).json()
    assert second["RefreshToken"] != first["RefreshToken"]
    reused = await client.post("/webcrm/Auth/ApiRefresh", json=refresh)
    assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
    orgs = await client.get("/webcrm/Organisations", headers=bearer(second["AccessToken"]))
    assert orgs.status_code == 200 and orgs.json()
    bad = await client.post("/webcrm/Auth/ApiLogin", params={"authCode": "nope"})
    assert bad.status_code == 401


async def test_api_keys_in_header_and_query(client: httpx.AsyncClient) -> None:
    """WooCommerce takes its key pair in the query and PowerOffice its key in X-API-Key."""
    orders = "/woocommerce/wp-json/wc/v3/orders"
    keys = {"consumer_key": "ck_demo", "consumer_secret": "cs_demo"}
    assert (await client.get(orders, params=keys)).status_code == 200
    assert (await client.get(orders, params={**keys, "consumer_secret": "x"})).status_code == 401
    assert (await client.get(orders)).status_code == 401
    good = await client.get("/poweroffice/v2/customers", headers=POWEROFFICE_KEY)
    assert good.status_code == 200 and good.json()
    bad = await client.get("/poweroffice/v2/customers", headers={"X-API-Key": "x"})
    assert bad.status_code == 401


async def test_fault_429_then_recovers(client: httpx.AsyncClient) -> None:
    """A fault answers 429 + Retry-After `times` times (still counted); DELETE disarms faults."""
    fault = {"path_prefix": "/poweroffice", "status": 429, "retry_after": "2", "times": 2}
    assert (await client.post("/_admin/faults", json=fault)).status_code == 201
    url = "/poweroffice/v2/customers"
    answers = [await client.get(url, headers=POWEROFFICE_KEY) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [429, 429, 200]
    assert answers[0].headers["Retry-After"] == "2"
    assert (await stats(client))["requests"]["GET /poweroffice/v2/customers"] == 3
    await client.post("/_admin/faults", json={"path_prefix": "/", "status": 503, "times": 5})
    await client.delete("/_admin/faults")  # disarms every switch
    assert (await client.get(url, headers=POWEROFFICE_KEY)).status_code == 200


async def test_stats_count_requests_by_route_template(client: httpx.AsyncClient) -> None:
    """Stats count requests per method and path template and tally issued tokens."""
    await ermeo_login(client)
    await ermeo_login(client)
    for work_order_id in ("WO-7", "WO-8"):
        await client.get(f"{ERMEO_WORK_ORDERS}/{work_order_id}", headers=bearer("ermeo-user-alice"))
    report = await stats(client)
    assert report["requests"]["POST /ermeo/oauth/v2/token"] == 2
    assert report["requests"]["GET /ermeo/api/v1/work-orders/{work_order_id}"] == 2
    assert report["tokens_issued"]["ermeo"] == 2


async def test_reset_clears_counters_and_state(client: httpx.AsyncClient) -> None:
    """POST /_admin/reset forgets requests, tokens and work orders but keeps the demo setup."""
    token = (await ermeo_login(client))["access_token"]
    order = {"asset_id": "A-002", "title": "Check"}
    await client.post(ERMEO_WORK_ORDERS, json=order, headers=bearer(token))
    await client.post("/_admin/reset")
    report = await stats(client)
    assert report["work_orders"] == [] and report["tokens_issued"]["ermeo"] == 0
    assert report["requests"] == {"GET /_admin/stats": 1}
    assert (await client.get(ERMEO_ASSETS, headers=bearer(token))).status_code == 401
    await ermeo_login(client)


async def test_unknown_path_answers_json_404(client: httpx.AsyncClient) -> None:
    """A path no fake system serves gets a JSON 404 rather than plain text."""
    response = await client.get("/nowhere")
    assert (response.status_code, response.json()["error"]) == (404, "not_found")


async def test_real_server_on_loopback_serves_sandbox() -> None:
    """The app runs under uvicorn on 127.0.0.1 with an ephemeral port and shuts down cleanly."""
    config = uvicorn.Config(create_app(), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no start-up event
                await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            access = bearer((await ermeo_login(http))["access_token"])
            page = await http.get(ERMEO_ASSETS, headers=access)
            assert page.json()["next"] == f"{base}/ermeo/api/v1/assets?site=HQ&page=2"
            tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
            params = {**TRIPLETEX_KEYS, "expirationDate": tomorrow.isoformat()}
            assert (await http.put(TRIPLETEX_CREATE, params=params)).status_code == 200
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)
