"""`flowrunner runs rerun` replays a run; a connected user's token, never stored, is given
again with --user-token."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from typer.testing import CliRunner
from upstream_server import Upstream

from flowrunner.app import open_database
from flowrunner.cli import app
from flowrunner.loader import load_project
from flowrunner.store.runs import RunRecord

ProjectWriter = Callable[..., Path]
NOW = datetime.now(UTC)

FLOW = """
name: as-user
outputs: {seen: "${{ steps.call.body.headers.authorization }}"}
steps:
  - id: call
    http: {url: /echo, auth: me}
"""
PROFILE = """
name: me
kind: connected_user
base_url: @BASE@
"""


def test_rerun_replays_the_trigger_and_takes_the_user_token_again(
    write_project: ProjectWriter, upstream: Upstream
) -> None:
    """A connected-user run reruns with --user-token; without it, the rerun says why it fails."""
    root = write_project({"as-user": FLOW}, {"me": PROFILE})
    runner = CliRunner()
    first = runner.invoke(
        app, ["run", "as-user", "--user-token", "alice-token-123", "--project", str(root)]
    )
    assert first.exit_code == 0, first.output
    run_id = first.output.split("run ")[-1].split()[0]

    without = runner.invoke(app, ["runs", "rerun", run_id, "--project", str(root)])
    assert without.exit_code == 1
    assert "--user-token" in without.output

    again = runner.invoke(
        app,
        ["runs", "rerun", run_id, "--user-token", "alice-token-123", "--project", str(root)],
    )
    assert again.exit_code == 0, again.output
    assert "alice-token-123" not in again.output
    assert "succeeded (rerun of" in again.output


def test_runs_list_and_show_name_the_user_of_the_token(
    write_project: ProjectWriter, upstream: Upstream
) -> None:
    """A run made with a user's JWT shows that user in `runs list` (a user column appears
    once a run has a user) and `runs show`; the token itself is shown nowhere."""
    root = write_project({"as-user": FLOW}, {"me": PROFILE})
    runner = CliRunner()
    claims = base64.urlsafe_b64encode(b'{"email":"alice@acme.example"}').decode().rstrip("=")
    token = f"eyJhbGciOiJIUzI1NiJ9.{claims}.c2lnbmF0dXJl"
    opaque = runner.invoke(
        app, ["run", "as-user", "--user-token", "opaque-1", "--project", str(root)]
    )
    assert opaque.exit_code == 0, opaque.output
    plain = runner.invoke(app, ["runs", "list", "--project", str(root)])
    assert "user" not in plain.output.splitlines()[0]

    first = runner.invoke(app, ["run", "as-user", "--user-token", token, "--project", str(root)])
    assert first.exit_code == 0, first.output
    run_id = first.output.split("run ")[-1].split()[0]

    listed = runner.invoke(app, ["runs", "list", "--project", str(root)])
    assert listed.exit_code == 0, listed.output
    assert "user" in listed.output.splitlines()[0]
    assert "alice@acme.example" in listed.output
    shown = runner.invoke(app, ["runs", "show", run_id, "--project", str(root)])
    assert "user: alice@acme.example" in shown.output
    assert token not in listed.output + shown.output


HOOKED = """
name: hooked
triggers:
  - webhook: {path: hooked, auth: {connected_user: true}}
steps:
  - id: who
    set: {caller: "${{ trigger.user }}"}
"""


def _jwt(email: str) -> str:
    claims = base64.urlsafe_b64encode(f'{{"email":"{email}"}}'.encode()).decode().rstrip("=")
    return f"eyJhbGciOiJIUzI1NiJ9.{claims}.c2lnbmF0dXJl"


def test_a_rerun_names_the_user_of_its_own_token(write_project: ProjectWriter) -> None:
    """A webhook run rerun with another user's token has that user as `trigger.user` and
    `run.user`; rerun without a token, it has none (not the original caller)."""
    root = write_project({"hooked": HOOKED})
    trigger = {"kind": "webhook", "headers": {"authorization": "***"}, "user": "ada@acme.example"}
    database, history = open_database(load_project(root))
    history.record(RunRecord("0ada", "hooked", "succeeded", trigger, {}, NOW, NOW))
    database.close()
    runner = CliRunner()
    for token, user in ((_jwt("bob@acme.example"), "bob@acme.example"), (None, None)):
        extra = ["--user-token", token] if token else []
        rerun = runner.invoke(app, ["runs", "rerun", "0ada", *extra, "--project", str(root)])
        assert rerun.exit_code == 0, rerun.output
        run_id = rerun.output.split("(rerun of")[0].split("run ")[-1].split()[0]
        database, history = open_database(load_project(root))
        record = history.get_run(run_id)
        database.close()
        assert record is not None
        assert record.trigger["user"] == user
        assert record.user == user
        assert record.steps[0].outputs == {"caller": user}
