"""``flowrunner profiles remind``, ``profiles calendar`` and ``profiles`` as an operator runs
them: real processes on a project whose machine-user token expires in ten days, with the
state database read back afterwards."""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

Flowrunner = Callable[..., subprocess.CompletedProcess[str]]
PROFILE = "iobeya-machine-user"
OWNER = "it-admins@acme.example"
HOOK_SECRET = "hook-secret-0d9c4a"


def make_jwt(iat: datetime, exp: datetime) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    claims = {"sub": "machine-user", "iat": int(iat.timestamp()), "exp": int(exp.timestamp())}
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJlLXg"


@pytest.fixture(scope="module")
def pycache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bytecode for the CLI processes, outside the repository and kept across sessions
    under pytest's temporary root: compiling the package costs each fresh cache seconds."""
    path = tmp_path_factory.getbasetemp().parent / "flowrunner-cli-pycache"
    path.mkdir(exist_ok=True)
    return path


def _run(pycache: Path, args: tuple[str, ...], cwd: Path, text: bool) -> Any:
    env = {**os.environ, "COLUMNS": "240", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "flowrunner", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        encoding="utf-8" if text else None,
        timeout=60,
        check=False,
    )


@pytest.fixture
def flowrunner(pycache: Path) -> Flowrunner:
    """Run ``python -m flowrunner ARGS`` in ``cwd`` and capture what it prints, as text."""

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = _run(pycache, args, cwd, text=True)
        return result

    return run


@pytest.fixture
def flowrunner_bytes(pycache: Path) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """The same, as bytes: what was written exactly, line endings included."""

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
        result: subprocess.CompletedProcess[bytes] = _run(pycache, args, cwd, text=False)
        return result

    return run


@pytest.fixture
def expiry() -> datetime:
    return (datetime.now(UTC) + timedelta(days=10)).replace(microsecond=0)


def write_project(root: Path, token: str, settings: str | None = None) -> Path:
    (root / "auth_profiles").mkdir()
    (root / "flows").mkdir()
    (root / "auth_profiles" / f"{PROFILE}.yaml").write_text(
        textwrap.dedent(f"""\
            name: {PROFILE}
            kind: bearer
            token: ${{{{ secrets.IOBEYA_TOKEN }}}}
            allowed_hosts: [acme.iobeya.example]
            regenerate_every: 365d
            owner: {OWNER}
            """)
    )
    (root / "flows" / "copy-cards.yaml").write_text(
        textwrap.dedent(f"""\
            name: copy-cards
            steps:
              - id: card
                http:
                  method: POST
                  url: https://acme.iobeya.example/s/api/cards
                  auth: {PROFILE}
            """)
    )
    (root / ".env").write_text(f"IOBEYA_TOKEN={token}\nHOOK_SECRET={HOOK_SECRET}\n")
    if settings is not None:
        (root / "flowrunner.yaml").write_text(textwrap.dedent(settings))
    return root


def rows(root: Path, query: str) -> list[tuple[Any, ...]]:
    database = root / ".flowrunner" / "state.db"
    if not database.exists():
        return []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        return conn.execute(query).fetchall()


def test_remind_dry_run_sends_nothing_then_remind_delivers_through_the_log(
    tmp_path: Path, flowrunner: Flowrunner, expiry: datetime
) -> None:
    """`profiles remind --dry-run` prints the due reminder with what to do and records and
    queues nothing; `profiles remind` then sends it through the log channel (a WARNING
    line), records it, and `profiles` shows the next one 7 days before expiry."""
    token = make_jwt(expiry - timedelta(days=365), expiry)
    project = write_project(tmp_path, token)

    dry = flowrunner("profiles", "remind", "--dry-run", cwd=project)
    assert dry.returncode == 0, dry.stderr
    assert f"[flowrunner] {PROFILE}: credential expires in 10 days" in dry.stdout
    assert f"expires on {expiry:%Y-%m-%d %H:%M} UTC" in dry.stdout
    assert "Flows that use it: copy-cards." in dry.stdout
    assert f"Owner: {OWNER}." in dry.stdout
    assert "as the machine user" in dry.stdout
    assert f"flowrunner profiles set-token {PROFILE}" in dry.stdout
    assert "delivered" not in dry.stdout
    assert "WARNING flowrunner.notify" not in dry.stderr  # nothing was delivered
    assert token not in dry.stdout + dry.stderr
    assert rows(project, "SELECT id FROM outbox") == []
    assert rows(project, "SELECT profile FROM reminders_sent") == []

    sent = flowrunner("profiles", "remind", cwd=project)
    assert sent.returncode == 0, sent.stderr
    assert f"[flowrunner] {PROFILE}: credential expires in 10 days" in sent.stdout
    assert "delivered 1, failed 0" in sent.stdout
    assert f"WARNING flowrunner.notify: [flowrunner] {PROFILE}: credential expires" in sent.stderr
    assert "What to do:" in sent.stderr
    assert token not in sent.stdout + sent.stderr
    assert rows(project, "SELECT channel, status, attempts FROM outbox") == [("log", "sent", 1)]
    settled = rows(project, "SELECT threshold_seconds FROM reminders_sent ORDER BY 1")
    assert settled == [(14 * 86400,), (30 * 86400,)]  # one reminder settled both thresholds

    listing = flowrunner("profiles", cwd=project)
    assert listing.returncode == 0, listing.stderr
    [line] = [line for line in listing.stdout.splitlines() if line.strip().startswith(PROFILE)]
    assert "expiring" in line
    assert f"{expiry - timedelta(days=7):%Y-%m-%d %H:%M} (in 3d)" in line  # next reminder
    assert "not delivered" not in listing.stdout
    assert token not in listing.stdout + listing.stderr


def test_a_channel_that_is_down_shows_in_profiles_until_delivered(
    tmp_path: Path, flowrunner: Flowrunner, expiry: datetime
) -> None:
    """A reminder whose webhook channel is unreachable is kept, and `flowrunner profiles`
    lists it as not delivered yet with the error and the next attempt, no secret shown."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = make_jwt(expiry - timedelta(days=365), expiry)
    settings = f"""\
        channels:
          hook:
            type: webhook
            url: "http://127.0.0.1:{port}/notify?key=${{{{ secrets.HOOK_SECRET }}}}"
            format: slack
        default_notify: [hook]
        """
    project = write_project(tmp_path, token, settings)

    remind = flowrunner("profiles", "remind", cwd=project)
    assert remind.returncode == 0, remind.stderr
    assert "delivered 0, failed 1" in remind.stdout
    assert HOOK_SECRET not in remind.stdout + remind.stderr

    listing = flowrunner("profiles", cwd=project)
    assert listing.returncode == 0, listing.stderr
    assert "1 notification(s) not delivered yet" in listing.stdout
    [line] = [line for line in listing.stdout.splitlines() if "via hook" in line]
    assert f"[flowrunner] {PROFILE}: credential expires in 10 days" in line
    assert "(1 attempt(s), next " in line
    assert HOOK_SECRET not in listing.stdout + listing.stderr
    assert token not in listing.stdout + listing.stderr
    [(status, attempts, error)] = rows(project, "SELECT status, attempts, last_error FROM outbox")
    assert (status, attempts) == ("failed", 1)
    assert error and HOOK_SECRET not in error


def test_calendar_prints_a_valid_icalendar_with_the_deadline(
    tmp_path: Path,
    flowrunner_bytes: Callable[..., subprocess.CompletedProcess[bytes]],
    expiry: datetime,
) -> None:
    """`profiles calendar` prints an iCalendar file (CRLF, lines of at most 75 octets,
    balanced BEGIN/END) with one event at the token's deadline."""
    project = write_project(tmp_path, make_jwt(expiry - timedelta(days=365), expiry))
    calendar = flowrunner_bytes("profiles", "calendar", cwd=project)
    assert calendar.returncode == 0, calendar.stderr.decode()
    result = calendar.stdout

    assert result.endswith(b"\r\n")
    physical = result[:-2].split(b"\r\n")
    assert all(len(line) <= 75 and b"\n" not in line for line in physical)
    logical: list[str] = []
    for line in physical:
        if line.startswith(b" "):
            logical[-1] += line[1:].decode()
        else:
            logical.append(line.decode())
    stack: list[str] = []
    starts = []
    for line in logical:
        name, _, value = line.partition(":")
        if name == "BEGIN":
            stack.append(value)
        elif name == "END":
            assert stack.pop() == value
        elif name == "DTSTART":
            starts.append(value)
    assert stack == []
    assert (logical[0], logical[-1]) == ("BEGIN:VCALENDAR", "END:VCALENDAR")
    assert logical.count("BEGIN:VEVENT") == 1
    assert starts == [f"{expiry:%Y%m%dT%H%M%SZ}"]
    assert any(line.startswith("SUMMARY:") and PROFILE in line for line in logical)
