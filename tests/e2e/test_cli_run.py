"""``flowrunner run`` and ``flowrunner runs`` as an operator uses them: a real process
against a real HTTP server, with the history in the project's state database."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from local_server import serve_in_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flowrunner.app import open_database
from flowrunner.loader import load_project
from flowrunner.store.runs import RunRecord

SECRET = "cli-secret-4f1b/9"


@dataclass
class Server:
    base_url: str
    calls: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str) -> int:
        with self.lock:
            return self.calls[key]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """An echo server on 127.0.0.1 that counts calls per ?key=, in a background thread."""
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    async def echo(request: Request) -> Response:
        with lock:
            calls[request.query_params.get("key", "")] += 1
        status = int(request.query_params.get("status", "200"))
        payload = {
            "method": request.method,
            "query": dict(request.query_params),
            "body": (await request.body()).decode(),
        }
        return JSONResponse(payload, status_code=status)

    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])])
    with serve_in_thread(app, "cli-upstream") as base_url:
        yield Server(base_url, calls, lock)


@pytest.fixture(scope="module")
def pycache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bytecode for the CLI processes, kept outside the repository: each process would
    otherwise compile every module again (this environment sets PYTHONDONTWRITEBYTECODE)."""
    return tmp_path_factory.mktemp("pycache")


@pytest.fixture
def flowrunner(pycache: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m flowrunner ARGS`` in ``cwd`` and capture what it prints."""
    return functools.partial(_flowrunner, pycache=pycache)


def _flowrunner(*args: str, cwd: Path, pycache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLI_TOKEN": SECRET, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "flowrunner", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


HELLO = """
name: hello
inputs:
  name: {type: string}
  times: {type: integer, default: 1}
steps:
  - id: greet
    http:
      method: POST
      url: @BASE@/echo
      query: {key: "@KEY@"}
      headers: {Authorization: "Bearer ${{ secrets.CLI_TOKEN }}", X-Key: "${{ secrets.CLI_TOKEN }}"}
      json:
        greeting: "hello ${{ inputs.name }}"
        times: ${{ inputs.times }}
        from_body: "${{ trigger.body.source if trigger.body is defined else 'none' }}"
    outputs: {sent: $.body}
  - id: note
    log: "greeted ${{ inputs.name }}"
outputs:
  greeting: ${{ steps.greet.outputs.sent | fromjson }}
"""

BROKEN = """
name: broken
steps:
  - id: lookup
    http: {url: "@BASE@/echo?status=404&key=@KEY@"}
"""


@pytest.fixture
def project(make_project: Callable[..., Path], server: Server) -> tuple[Path, str]:
    """A project whose flows call the server under a fresh key."""
    key = os.urandom(6).hex()

    def fill(text: str) -> str:
        return text.replace("@BASE@", server.base_url).replace("@KEY@", key)

    root = make_project(flows={"hello": fill(HELLO), "broken": fill(BROKEN)})
    return root, key


Cli = Callable[..., subprocess.CompletedProcess[str]]


def runs_in_history(root: Path) -> list[RunRecord]:
    database, history = open_database(load_project(root))
    try:
        return history.list_runs()
    finally:
        database.close()


def test_run_then_list_show_and_rerun(
    project: tuple[Path, str], server: Server, flowrunner: Cli
) -> None:
    """`run FLOW --input k=v --body FILE` prints its steps and outputs and exits 0 (the body
    is trigger.body); `runs list` shows the run, `runs show ID` its steps with request and
    response, secrets masked; `runs rerun ID` runs it again with the same inputs and body."""
    root, key = project
    (root / "body.json").write_text(json.dumps({"source": "file"}))
    first = flowrunner(
        "run", "hello", "--input", "name=Ann", "--input", "times=2", "--body", "body.json", cwd=root
    )
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert re.search(rf"succeeded greet \(http, \d+ ms\)  POST {server.base_url}/echo\?key=", out)
    assert "-> 200" in out
    assert re.search(r"succeeded note \(log, \d+ ms\)\n\s+greeted Ann", out)
    assert '"greeting": "hello Ann"' in out and '"times": 2' in out
    assert '"from_body": "file"' in out
    assert SECRET not in out + first.stderr
    assert server.count(key) == 1
    found = re.search(r"run ([0-9a-f-]{36}) succeeded", out)
    assert found is not None
    run_id = found[1]

    listed = flowrunner("runs", "list", cwd=root)
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"{run_id[:8]}\s+hello\s+succeeded", listed.stdout)

    shown = flowrunner("runs", "show", run_id[:8], cwd=root)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"run {run_id}  flow hello  succeeded" in text
    assert '"name": "Ann"' in text and '"source": "file"' in text
    request = re.search(r"request: (\{.*\})", text)
    response = re.search(r"response: (\{.*\})", text)
    assert request is not None and response is not None
    sent = json.loads(request[1])
    assert sent["method"] == "POST"
    assert sent["headers"]["authorization"] == "***" and sent["headers"]["x-key"] == "***"
    assert json.loads(sent["body"])["greeting"] == "hello Ann"
    received = json.loads(response[1])
    assert received["status"] == 200 and received["body"]["method"] == "POST"
    assert SECRET not in text

    rerun = flowrunner("runs", "rerun", run_id[:8], cwd=root)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert re.search(rf"run [0-9a-f-]{{36}} succeeded \(rerun of {run_id}\)", rerun.stdout)
    assert server.count(key) == 2
    runs = runs_in_history(root)
    assert [r.status for r in runs] == ["succeeded", "succeeded"]
    assert runs[0].inputs == runs[1].inputs == {"name": "Ann", "times": "2"}
    assert runs[0].outputs == runs[1].outputs


def test_a_failing_flow_exits_1_with_its_error(
    project: tuple[Path, str], server: Server, flowrunner: Cli
) -> None:
    """A run that fails prints the failing step and the error, and exits 1."""
    root, key = project
    result = flowrunner("run", "broken", cwd=root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"failed lookup \(http, \d+ ms\)", result.stdout)
    assert re.search(r"run [0-9a-f-]{36} failed: step lookup: GET .* answered 404", result.stdout)
    assert server.count(key) == 1
    assert [r.status for r in runs_in_history(root)] == ["failed"]


def test_dry_run_prints_masked_requests_and_sends_nothing(
    project: tuple[Path, str], server: Server, flowrunner: Cli
) -> None:
    """`--dry-run` prints each rendered request with secrets masked, sends nothing and
    records nothing."""
    root, key = project
    result = flowrunner("run", "hello", "--input", "name=Bob", "--dry-run", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"greet: POST {server.base_url}/echo?key={key}" in out
    assert "authorization: ***" in out
    assert "x-key: ***" in out
    assert '"greeting":"hello Bob"' in out
    assert SECRET not in out + result.stderr
    assert server.count(key) == 0
    assert runs_in_history(root) == []
