"""The example project (``flows/``, ``auth_profiles/``, ``.env.example``) as a new user runs
it: real processes on a copy of it in a temporary directory.

The copy's hard-coded sandbox address (127.0.0.1:8900) is rewritten to a free port, where
``python -m flowrunner sandbox --port`` runs as its own process; the iObeya machine user's
bootstrap token is stored with ``profiles set-token`` fed from the sandbox's admin view;
then ``python -m flowrunner serve --port`` starts with the variables of ``.env.example``
in its environment. The tests share these two processes and run in file order: each
leaves the example usable for the next (the last one gives iObeya a 10-day token).
Outcomes are read where a user reads them: the sandbox's admin view, the webhook answers,
and the ``flowrunner`` commands' output. The state database is only read to wait, bounded,
until the server has no run in flight.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from processes import Background, flowrunner, free_port, process_env, read_env_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SANDBOX_ADDRESS = "127.0.0.1:8900"
ADMIN_KEY = {"X-Admin-Key": "iobeya-demo-admin"}
ASSETS = {f"Asset A-{n:03d}" for n in range(1, 26)}  # the sandbox has 25 assets per site
QUIET_SECONDS = 30.0
RELOAD_SECONDS = 15.0  # the server polls every second; generous for a loaded machine


@dataclass
class Example:
    """The running example: a copied project, its sandbox and its server."""

    root: Path
    env: dict[str, str]
    sandbox_url: str
    url: str
    sandbox: Background
    server: Background
    iobeya_token: str = ""

    def cli(
        self, *args: str, stdin: str | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``python -m flowrunner ARGS`` in the project, as a user types it."""
        done = flowrunner(*args, cwd=self.root, env=self.env, stdin=stdin)
        if ok:
            assert done.returncode == 0, (
                f"flowrunner {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done

    def get(self, path: str) -> httpx.Response:
        with httpx.Client(timeout=30, trust_env=False) as client:
            return client.get(path if path.startswith("http") else f"{self.sandbox_url}{path}")

    def post(
        self,
        url: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        with httpx.Client(timeout=30, trust_env=False) as client:
            return client.post(url, json=json_body, content=content, headers=headers)

    def stats(self) -> dict[str, Any]:
        answer = self.get("/_admin/stats")
        assert answer.status_code == 200, answer.text
        stats: dict[str, Any] = answer.json()
        return stats

    def set_iobeya_token(self, issued: str) -> None:
        """Pipe a token-issuing answer (JSON with a ``token``) into ``profiles set-token``."""
        done = self.cli("profiles", "set-token", "iobeya-machine-user", stdin=issued)
        assert "stored a new token for iobeya-machine-user" in done.stdout
        self.iobeya_token = json.loads(issued)["token"]

    def runs(self) -> tuple[int, list[tuple[str, str, str, str]]]:
        """Runs waiting in the server's queue, and (id, flow, status, trigger kind) of every
        run in the history, from the state database."""
        database = self.root / ".flowrunner" / "state.db"
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as conn:
            waiting = conn.execute("SELECT count(*) FROM run_queue WHERE status != 'done'")
            queued: int = waiting.fetchone()[0]
            rows = conn.execute("SELECT id, flow, status, trigger FROM runs").fetchall()
        return queued, [(i, f, s, json.loads(t).get("kind", "")) for i, f, s, t in rows]

    def wait_quiet(self, seconds: float = QUIET_SECONDS) -> list[tuple[str, str, str, str]]:
        """The runs, once none is queued or running (bounded wait)."""
        deadline = time.monotonic() + seconds
        while True:
            in_flight = self.get(f"{self.url}/status").json()["in_flight"]
            queued, runs = self.runs()
            busy = [r for r in runs if r[2] in ("queued", "running")]
            if in_flight == 0 and queued == 0 and not busy:
                return runs
            assert time.monotonic() < deadline, f"still busy: {queued} queued, runs {busy}"
            time.sleep(0.1)


def copy_example(root: Path, sandbox_port: int) -> None:
    """Copy the example project, pointing its sandbox address at ``sandbox_port``."""
    shutil.copytree(REPO / "flows", root / "flows")
    shutil.copytree(REPO / "auth_profiles", root / "auth_profiles")
    shutil.copy(REPO / ".env.example", root / ".env.example")
    for path in [*root.glob("flows/*.yaml"), *root.glob("auth_profiles/*.yaml")]:
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace(SANDBOX_ADDRESS, f"127.0.0.1:{sandbox_port}"))
        assert ":8900" not in path.read_text(encoding="utf-8"), f"{path.name}: another address"


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    """The sandbox, the bootstrap token stored, then ``flowrunner serve``; both stopped (and
    killed if need be) at the end of the module."""
    root = tmp_path_factory.mktemp("example")
    logs = tmp_path_factory.mktemp("example-logs")
    # Shared with the other e2e modules: compiling the package costs each fresh cache seconds.
    pycache = tmp_path_factory.getbasetemp().parent / "flowrunner-cli-pycache"
    pycache.mkdir(exist_ok=True)
    sandbox_port = free_port()
    while (port := free_port()) == sandbox_port:
        pass
    copy_example(root, sandbox_port)
    env = process_env(
        {**read_env_file(root / ".env.example"), "FLOWRUNNER_SECRET_KEY": "e2e-example-key"},
        pycache,
    )
    started: list[Background] = []
    try:
        sandbox = Background(
            ["sandbox", "--port", str(sandbox_port)], root, env, logs / "sandbox.log"
        )
        started.append(sandbox)
        sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        sandbox.wait_ready(f"{sandbox_url}/_admin/stats")
        with httpx.Client(timeout=30, trust_env=False) as client:
            bootstrap = client.get(f"{sandbox_url}/_admin/iobeya/bootstrap-token").text
        # Before serve starts, so that the schedules' catch-up runs find the token.
        stored = flowrunner(
            "profiles", "set-token", "iobeya-machine-user", cwd=root, env=env, stdin=bootstrap
        )
        assert "stored a new token" in stored.stdout, stored.stdout + stored.stderr
        server = Background(["serve", "--port", str(port)], root, env, logs / "serve.log")
        started.append(server)
        url = f"http://127.0.0.1:{port}"
        server.wait_ready(f"{url}/healthz")
        yield Example(root, env, sandbox_url, url, sandbox, server, json.loads(bootstrap)["token"])
    finally:
        for process in reversed(started):
            process.stop()


def cards_and_copies(example: Example) -> tuple[int, int]:
    """(cards in the sandbox, succeeded ermeo-assets-to-iobeya runs), once the server is quiet.

    Every succeeded copy creates 25 cards; comparing the two keeps the checks right when
    the flow's 15-minute schedule happens to fire while a test runs."""
    runs = example.wait_quiet()
    succeeded = [r for r in runs if r[1:3] == ("ermeo-assets-to-iobeya", "succeeded")]
    return len(example.stats()["cards"]), len(succeeded)


def runs_listed(example: Example) -> dict[str, tuple[str, str]]:
    """``flowrunner runs list`` parsed: short id -> (flow, status)."""
    listed = example.cli("runs", "list").stdout
    rows = re.findall(r"^\s*([0-9a-f]{8})\s+(\S+)\s+(\S+)\s", listed, re.MULTILINE)
    assert rows, listed
    return {run_id: (flow, status) for run_id, flow, status in rows}


def signed(body: bytes, secret: str) -> str:
    """WooCommerce's webhook signature: base64 of the body's HMAC-SHA256."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def test_every_example_flow_runs_green(example: Example) -> None:
    """The scheduled flows catch up on start, tripletex-invoices runs from the command line,
    both webhooks answer as the tutorial says, notify-team runs from the flow that calls it,
    and the sandbox and ``runs list`` show every outcome, with no secret in the output."""
    caught_up = example.wait_quiet()
    schedule_runs = {(flow, status) for _, flow, status, kind in caught_up if kind == "schedule"}
    assert ("ermeo-assets-to-iobeya", "succeeded") in schedule_runs, caught_up
    assert ("crm-customer-check", "succeeded") in schedule_runs, caught_up
    copies = sum(
        1
        for _, flow, status, _ in caught_up
        if (flow, status) == ("ermeo-assets-to-iobeya", "succeeded")
    )
    stats = example.stats()
    cards = Counter(card["title"] for card in stats["cards"])
    assert set(cards) == ASSETS and set(cards.values()) == {copies}, cards
    assert {card["created_by"] for card in stats["cards"]} == {"flowrunner-bot"}
    requests = stats["requests"]
    assert requests["GET /ermeo/api/v1/assets"] == 3 * copies  # 25 assets, pages of 10
    assert requests["POST /iobeya/s/api/cards"] == 25 * copies
    assert requests["GET /superoffice/api/v1/Contact"] >= 1
    assert requests["GET /webcrm/Organisations"] >= 1

    invoices = example.cli("run", "tripletex-invoices")
    assert re.search(r"\d+ invoices, total \d", invoices.stdout), invoices.stdout
    assert re.search(r"run \S+ succeeded", invoices.stdout), invoices.stdout

    order = {"asset_id": "A-001", "title": "Inspect pump"}
    alice = {"Authorization": "Bearer ermeo-user-alice", "X-Request-Id": "demo-1"}
    first = example.post(f"{example.url}/hooks/work-orders", json_body=order, headers=alice)
    assert first.status_code == 201, first.text
    # The tutorial's first work order, answered as its comment shows.
    assert f"# {first.text}\n" in readme_block("Call the webhook as Alice"), first.text
    again = example.post(f"{example.url}/hooks/work-orders", json_body=order, headers=alice)
    assert (again.status_code, again.json()) == (201, first.json())  # dedupe on X-Request-Id
    assert example.stats()["work_orders"] == [
        {"id": first.json()["work_order"], **order, "created_by": "alice@acme.example"}
    ]

    secret = example.env["SHOP_WEBHOOK_SECRET"]
    body = json.dumps({"id": 7001, "status": "processing"}).encode()
    shop = example.post(
        f"{example.url}/hooks/shop/orders",
        content=body,
        headers={
            "Content-Type": "application/json",
            "X-WC-Webhook-Signature": signed(body, secret),
        },
    )
    assert shop.status_code == 200, shop.text
    assert shop.json() == {
        "orders": [5001, 5002, 5003],
        "customers": ["Fjord Logistics AS", "Bergen Bakeri AS"],
        "first_total": "149.00",
    }
    forged = example.post(
        f"{example.url}/hooks/shop/orders",
        content=body,
        headers={"Content-Type": "application/json", "X-WC-Webhook-Signature": signed(body, "x")},
    )
    assert forged.status_code == 401, forged.text

    # At 06:00-07:00 UTC on weekdays the 07:00 Paris schedule catches up too: one of the
    # ermeo-assets-to-iobeya fires is then skipped (concurrency limit 1, when busy: skip).
    runs = example.wait_quiet()
    assert {status for *_, status, _ in runs} <= {"succeeded", "skipped"}, runs
    listed = {i: run for i, run in runs_listed(example).items() if run[1] != "skipped"}
    expected = {
        "ermeo-assets-to-iobeya",
        "crm-customer-check",
        "tripletex-invoices",
        "create-work-order",
        "shop-orders",
    }
    assert {flow for flow, _ in listed.values()} == expected, listed
    assert {status for _, status in listed.values()} == {"succeeded"}, listed
    assert sum(1 for flow, _ in listed.values() if flow == "create-work-order") == 1, listed
    requests = example.stats()["requests"]
    assert requests["GET /woocommerce/wp-json/wc/v3/orders"] == 4  # the list, then 3 details
    assert requests["GET /poweroffice/v2/customers"] == 1
    assert requests["POST /ermeo/api/v1/work-orders"] == 1

    shop_run = next(run_id for run_id, (flow, _) in listed.items() if flow == "shop-orders")
    shown = example.cli("runs", "show", shop_run).stdout
    details = re.findall(r"^\s+outputs: (\{.*\})$", shown, re.MULTILINE)
    for total in ("149.00", "899.50", "42.00"):  # each order looked up by its own id
        assert f'{{"total": "{total}"}}' in details, shown
    assert re.search(r"succeeded held\[0\]\.tell>message .*\n\s+Order 5003 is on hold", shown)
    assert '"sent": "Order 5003 is on hold"' in shown, shown
    secrets = read_env_file(example.root / ".env.example")
    printed = shown + invoices.stdout + example.server.output()
    for name, value in [*secrets.items(), ("IOBEYA_TOKEN", example.iobeya_token)]:
        assert not value or value not in printed, f"{name} appears in the output"


def test_expired_ermeo_tokens_are_refreshed_once_and_never_reused(example: Example) -> None:
    """With the Ermeo access token expired, two ``flowrunner run`` processes at once both
    succeed on one refresh and no refresh token is reused; with the refresh token expired
    too, the refused refresh (invalid_grant) is followed by a password login and the
    profile stays ok."""
    cards, copied = cards_and_copies(example)
    before = example.stats()
    expired = example.post(f"{example.sandbox_url}/_admin/ermeo/expire-access-tokens")
    assert expired.status_code == 200 and expired.json()["expired"] >= 1, expired.text

    def run_flow(_: int) -> subprocess.CompletedProcess[str]:
        return flowrunner("run", "ermeo-assets-to-iobeya", cwd=example.root, env=example.env)

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(run_flow, range(2)))
    for done in both:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Copied 25 assets from HQ" in done.stdout
    after = example.stats()
    assert after["refresh_token_reuses"] == 0
    assert after["tokens_issued"]["ermeo"] == before["tokens_issued"]["ermeo"] + 1
    cards_now, copied_now = cards_and_copies(example)
    assert copied_now >= copied + 2 and cards_now == cards + 25 * (copied_now - copied)

    for lapse in ("expire-access-tokens", "expire-refresh-tokens"):
        answer = example.post(f"{example.sandbox_url}/_admin/ermeo/{lapse}")
        assert answer.status_code == 200 and answer.json()["expired"] >= 1, answer.text
    again = example.cli("run", "ermeo-assets-to-iobeya")
    assert "invalid_grant" in again.stderr, again.stderr
    final = example.stats()
    logins = "POST /ermeo/oauth/v2/token"
    assert final["requests"][logins] == after["requests"][logins] + 2  # refused, then password
    assert final["tokens_issued"]["ermeo"] == after["tokens_issued"]["ermeo"] + 1
    assert final["refresh_token_reuses"] == 0
    profiles = example.cli("profiles").stdout
    assert re.search(r"^\s*ermeo-service-account\s+oauth2\s+ok\s", profiles, re.MULTILINE), profiles


def test_a_revoked_iobeya_token_rejects_the_profile_until_a_new_one_is_set(
    example: Example,
) -> None:
    """Revoked in iObeya, the machine user's token fails the run with what an administrator
    must do and turns the profile ``rejected``; a freshly issued token stored with
    ``profiles set-token`` makes the next run succeed."""
    revoked = example.post(
        f"{example.sandbox_url}/iobeya/admin/tokens/revoke",
        json_body={"token": example.iobeya_token},
        headers=ADMIN_KEY,
    )
    assert revoked.status_code == 200, revoked.text
    failed = example.cli("run", "ermeo-assets-to-iobeya", ok=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "revoked" in failed.stdout and "An administrator must" in failed.stdout, failed.stdout
    assert "flowrunner profiles set-token iobeya-machine-user" in failed.stdout
    profiles = example.cli("profiles").stdout
    assert re.search(r"^\s*iobeya-machine-user\s+bearer\s+rejected\s", profiles, re.MULTILINE), (
        profiles
    )

    issued = example.post(
        f"{example.sandbox_url}/iobeya/admin/machine-users/flowrunner-bot/tokens",
        json_body={"validity_days": 365},
        headers=ADMIN_KEY,
    )
    assert issued.status_code == 201, issued.text
    example.set_iobeya_token(issued.text)
    cards, copied = cards_and_copies(example)
    rerun = example.cli("run", "ermeo-assets-to-iobeya")
    assert "Copied 25 assets from HQ" in rerun.stdout
    cards_now, copied_now = cards_and_copies(example)
    assert copied_now >= copied + 1 and cards_now == cards + 25 * (copied_now - copied)


def test_a_connected_user_without_the_permission_gets_the_runs_failure(example: Example) -> None:
    """Bob may only read work orders: the webhook answers with the run's failure naming the
    refused request and the missing role, no order is created, and Alice still can."""
    before = len(example.stats()["work_orders"])
    bob = example.post(
        f"{example.url}/hooks/work-orders",
        json_body={"asset_id": "A-001"},
        headers={"Authorization": "Bearer ermeo-user-bob"},
    )
    assert bob.status_code == 500, bob.text
    answer = bob.json()
    assert answer["status"] == "failed", answer
    assert "connected user is not allowed to POST" in answer["error"], answer
    assert "/work-orders" in answer["error"] and "missing role work_orders:write" in answer["error"]
    assert "roles" in answer["error"].split("missing role")[1], answer
    assert "ermeo-user-bob" not in bob.text  # the user's credential is masked
    assert len(example.stats()["work_orders"]) == before

    alice = example.post(
        f"{example.url}/hooks/work-orders",
        json_body={"asset_id": "A-002", "title": "Check valve"},
        headers={"Authorization": "Bearer ermeo-user-alice", "X-Request-Id": "demo-2"},
    )
    assert alice.status_code == 201, alice.text
    assert alice.json()["created_by"] == "alice@acme.example"


def readme_block(after: str) -> str:
    """The first fenced block of the README after the text ``after``."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(re.escape(after) + r".*?```\w*\n(.*?)```", readme, re.DOTALL)
    assert found, f"the README has no code block after {after!r}"
    return found.group(1)


def test_the_readme_tutorial_hello_flow_and_reminder(example: Example) -> None:
    """Followed literally, the tutorial's ``flows/hello-orders.yaml`` validates, is served
    at ``GET /hooks/hello`` after live reload, and a 10-day iObeya token makes
    ``profiles remind --dry-run`` print the reminder with who, when and what to do."""
    commands = readme_block("Check it first, the way a compiler would")
    assert "flowrunner validate flows/hello-orders.yaml" in commands
    assert "curl -s http://127.0.0.1:8800/hooks/hello" in commands
    (example.root / "flows" / "hello-orders.yaml").write_text(
        readme_block("Create `flows/hello-orders.yaml`"), encoding="utf-8"
    )
    validated = example.cli("validate", "flows/hello-orders.yaml")
    assert "ok:" in validated.stderr, validated.stderr

    deadline = time.monotonic() + RELOAD_SECONDS
    while (hello := example.get(f"{example.url}/hooks/hello")).status_code == 404:
        assert time.monotonic() < deadline, f"not reloaded:\n{example.server.output()}"
        time.sleep(0.2)
    assert hello.status_code == 200, hello.text
    assert hello.json() == {"count": 3, "ids": [5001, 5002, 5003]}

    reminder_steps = readme_block("Give the profile a token that expires in ten days")
    assert '{"validity_days": 10}' in reminder_steps
    assert "flowrunner profiles remind --dry-run" in reminder_steps
    issued = example.post(
        f"{example.sandbox_url}/iobeya/admin/machine-users/flowrunner-bot/tokens",
        json_body={"validity_days": 10},
        headers=ADMIN_KEY,
    )
    assert issued.status_code == 201, issued.text
    example.set_iobeya_token(issued.text)
    reminded = example.cli("profiles", "remind", "--dry-run").stdout
    lapses = issued.json()["expires_at"][:10]
    for promised in (
        "iobeya-machine-user",  # which profile
        "Flows that use it: ermeo-assets-to-iobeya",  # which flows
        f"expires on {lapses}",  # when it lapses
        "Owner: it-admins@acme.example",  # who owns it
        "as the machine user",  # what to do
        "flowrunner profiles set-token iobeya-machine-user",
    ):
        assert promised in reminded, reminded
