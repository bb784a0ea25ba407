"""``flowrunner profiles`` as an operator uses it: real processes against the sandbox.

Every command of this module is started at once by one fixture (they touch separate
projects, or only read), so the module waits for one process start-up, not six; each
test then checks one command's outcome.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from flowrunner.app import build_runtime, database_url, token_store
from flowrunner.loader import load_project
from flowrunner.sandbox import SandboxSettings, create_app
from flowrunner.sandbox.state import SandboxState
from flowrunner.store.database import Database
from flowrunner.store.tokens import Credential, ProfileStatus, fingerprint

ProjectFactory = Callable[..., Path]
TIMEOUT = 60.0
SECRETS = {
    "FRT_ERMEO_CLIENT_ID": "ermeo-demo-client",
    "FRT_ERMEO_CLIENT_SECRET": "ermeo-demo-secret",
    "FRT_ERMEO_USERNAME": "svc-flowrunner@acme.example",
    "FRT_ERMEO_PASSWORD": "demo-password",
    "FRT_WRONG_PASSWORD": "not-the-password",
}


@dataclass
class Sandbox:
    base_url: str
    state: SandboxState


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """The flowrunner sandbox on 127.0.0.1 (a free port), in a background thread."""
    app = create_app(SandboxSettings())
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="cli-sandbox", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the sandbox did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Sandbox(f"http://127.0.0.1:{port}", app.state.sandbox)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def jwt_like(claims: dict[str, Any]) -> str:
    def segment(value: dict[str, Any]) -> str:
        raw = json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{segment({'alg': 'HS256'})}.{segment(claims)}.c2lnbmF0dXJl"


def write_project(root: Path, base: str, bearer_token: str = "") -> Path:
    """Profiles: ``ermeo`` (logs in), ``broken`` (wrong password), ``iobeya`` (bearer),
    ``old-jwt`` (a bearer JWT that has expired), and a flow reading iObeya's boards."""
    (root / "flows").mkdir(parents=True)
    (root / "auth_profiles").mkdir()
    oauth2 = (
        "kind: oauth2\n"
        "grant: password\n"
        f"base_url: {base}/ermeo/api/v1\n"
        f"token_url: {base}/ermeo/oauth/v2/token\n"
        "body_format: json\n"
        "client_id: ${{ secrets.FRT_ERMEO_CLIENT_ID }}\n"
        "client_secret: ${{ secrets.FRT_ERMEO_CLIENT_SECRET }}\n"
        "username: ${{ secrets.FRT_ERMEO_USERNAME }}\n"
    )
    profiles = {
        "ermeo": oauth2 + "password: ${{ secrets.FRT_ERMEO_PASSWORD }}\n",
        "broken": oauth2 + "password: ${{ secrets.FRT_WRONG_PASSWORD }}\n",
        "iobeya": "kind: bearer\ntoken: ${{ secrets.FRT_IOBEYA_TOKEN }}\n"
        f"base_url: {base}/iobeya/s/api\nregenerate_every: 365d\n",
        "old-jwt": f"kind: bearer\ntoken: ${{{{ secrets.FRT_OLD_JWT }}}}\nbase_url: {base}\n",
    }
    for name, body in profiles.items():
        (root / "auth_profiles" / f"{name}.yaml").write_text(f"name: {name}\n{body}")
    (root / "flows" / "boards.yaml").write_text(
        "name: boards\nsteps:\n  - id: list\n    http: {url: boards, auth: iobeya}\n"
    )
    now = int(datetime.now(UTC).timestamp())
    values = SECRETS | {
        "FRT_IOBEYA_TOKEN": bearer_token,
        "FRT_OLD_JWT": jwt_like({"sub": "bot", "iat": now - 7200, "exp": now - 3600}),
    }
    (root / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return root


def store_credential(root: Path, credential: Credential) -> None:
    project = load_project(root)
    database = Database.open(database_url(project))
    try:
        token_store(project, database).save(credential)
    finally:
        database.close()


def stored(root: Path, profile: str) -> Credential | None:
    project = load_project(root)
    database = Database.open(database_url(project))
    try:
        return token_store(project, database).load(profile)
    finally:
        database.close()


@dataclass
class Outcome:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """The projects and what each command answered."""

    main: Path
    raw: Path
    json: Path
    argument: Path
    revoked: str
    new_token: str
    outcomes: dict[str, Outcome]


@pytest.fixture(scope="module")
def cli(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """Prepare the projects, then run every command of the module at once."""
    revoked = sandbox.state.mint_iobeya_token("bot", 365 * 86400).token
    new_token = sandbox.state.mint_iobeya_token("bot", 200 * 86400).token
    sandbox.state.iobeya.revoked_jtis.add(
        json.loads(base64.urlsafe_b64decode(revoked.split(".")[1] + "==")).get("jti")
    )
    projects = {
        name: write_project(tmp_path_factory.mktemp(name), sandbox.base_url, revoked)
        for name in ("main", "raw", "json", "argument")
    }
    for root in projects.values():
        # What a run that met the revoked token left behind.
        store_credential(
            root,
            Credential(
                "iobeya",
                revoked,
                status=ProfileStatus.REJECTED,
                last_error="refused with 401 before its expiry: revoked",
            ),
        )
    commands = {
        "list": (projects["main"], ["profiles"], None),
        "check-ok": (projects["main"], ["profiles", "check", "ermeo"], None),
        "check-broken": (projects["main"], ["profiles", "check", "broken"], None),
        "set-raw": (projects["raw"], ["profiles", "set-token", "iobeya"], new_token + "\n"),
        "set-json": (
            projects["json"],
            ["profiles", "set-token", "iobeya"],
            json.dumps({"token": new_token, "expires_at": "2027-01-01"}),
        ),
        "set-argument": (projects["argument"], ["profiles", "set-token", "iobeya", new_token], ""),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWRUNNER_")}
    env["COLUMNS"] = "240"
    started = {
        name: subprocess.Popen(  # noqa: S603 - our interpreter, our module
            [sys.executable, "-m", "flowrunner", *args],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (root, args, _) in commands.items()
    }
    outcomes = {}
    for name, process in started.items():
        try:
            out, err = process.communicate(commands[name][2], timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        outcomes[name] = Outcome(process.returncode, out, err)
    return Cli(
        projects["main"],
        projects["raw"],
        projects["json"],
        projects["argument"],
        revoked,
        new_token,
        outcomes,
    )


def row(output: str, profile: str) -> str:
    found = [line for line in output.splitlines() if re.match(rf"\s*{re.escape(profile)}\s", line)]
    assert len(found) == 1, output
    return found[0]


def test_profiles_lists_every_profile_with_its_status(cli: Cli) -> None:
    """``flowrunner profiles`` lists every profile with its kind and status: the revoked
    bearer token ``rejected``, the expired JWT ``expired``, the others ``ok``."""
    outcome = cli.outcomes["list"]
    assert outcome.code == 0, outcome.err
    assert re.search(r"\bbearer\s+rejected\b", row(outcome.out, "iobeya"))
    assert re.search(r"\bbearer\s+expired\b", row(outcome.out, "old-jwt"))
    assert re.search(r"\boauth2\s+ok\b", row(outcome.out, "ermeo"))
    assert re.search(r"\boauth2\s+(ok|needs_login)\b", row(outcome.out, "broken"))
    assert cli.revoked not in outcome.out + outcome.err


def test_profiles_check_exits_0_when_the_credential_works(cli: Cli) -> None:
    """``profiles check`` obtains a token for a working profile, says so without showing
    it, and exits 0."""
    outcome = cli.outcomes["check-ok"]
    assert outcome.code == 0, outcome.err
    assert "ermeo: token ok" in outcome.out
    credential = stored(cli.main, "ermeo")
    assert credential is not None and credential.access_token
    assert credential.access_token not in outcome.out
    assert f"fingerprint {fingerprint(credential.access_token)}" in outcome.out


def test_profiles_check_exits_1_when_the_credential_fails(cli: Cli) -> None:
    """``profiles check`` exits 1 with the reason when the login is refused, saying what a
    human must do, and never prints a secret."""
    outcome = cli.outcomes["check-broken"]
    assert outcome.code == 1, (outcome.out, outcome.err)
    assert "wrong username or password" in outcome.err
    assert "flowrunner profiles check broken" in " ".join(outcome.err.split())
    assert "Traceback" not in outcome.err
    assert SECRETS["FRT_WRONG_PASSWORD"] not in outcome.out + outcome.err


@pytest.mark.parametrize("form", ["raw", "json"])
async def test_set_token_reads_stdin_and_the_profile_works_again(
    cli: Cli, sandbox: Sandbox, form: str
) -> None:
    """``profiles set-token`` stores the token read from stdin (raw, or JSON with a
    ``token`` field), never echoes it, resets the profile to ``ok``, and the next run
    succeeds."""
    outcome = cli.outcomes[f"set-{form}"]
    assert outcome.code == 0, outcome.err
    assert "stored a new token for iobeya" in outcome.out
    assert cli.new_token not in outcome.out + outcome.err
    root = cli.raw if form == "raw" else cli.json
    credential = stored(root, "iobeya")
    assert credential is not None
    assert credential.access_token == cli.new_token and credential.status == "ok"
    runtime = build_runtime(root)
    try:
        record = await runtime.engine.run("boards", trigger={})
    finally:
        await runtime.aclose()
    assert record.status == "succeeded", record.error


def test_set_token_refuses_the_token_as_an_argument(cli: Cli) -> None:
    """``profiles set-token NAME TOKEN`` is refused (a token on the command line ends up
    in shell history) and stores nothing."""
    outcome = cli.outcomes["set-argument"]
    assert outcome.code != 0
    credential = stored(cli.argument, "iobeya")
    assert credential is not None and credential.access_token == cli.revoked
    assert credential.status == "rejected"
