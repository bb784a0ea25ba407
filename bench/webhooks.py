"""Webhook benchmark (W1): ``flowrunner serve`` against a hand-written Starlette + aiohttp app.

    python bench/webhooks.py [--duration 10] [--clients 1 16 64] [--repeat 1]
                             [--profile-seconds 10] [--no-profile] [--no-pin] [--keep]
    python bench/webhooks.py --callgrind 500

The W1 workload: ``POST /hooks/w1`` with ``{"customer": 7}`` → GET the customer with a
bearer token (an auth profile of kind ``bearer``) → POST an order built from it → a
synchronous 200 with the order id (``respond: wait`` and a ``respond`` step). flowrunner
runs it as ``python -m flowrunner serve``, durable intake and run history on (SQLite in
the project's ``.flowrunner/``); the baseline is a hand-written Starlette app served by
the same uvicorn, making the same two calls with one aiohttp ClientSession. Each server
runs alone (one after the other), pinned to CPU 0 (``taskset -c 0``); the upstream
(``bench/upstream.py``) and the load generator (``wrk``) share CPU 1. Each level of
concurrent clients (connections of ``wrk``, one thread) runs for ``--duration`` seconds
after a short warm-up; the figures are req/s and p50/p99 latency as ``wrk --latency``
reports them, and their ratios (goal: flowrunner ≥ 0.7x the baseline's req/s, p99 < 2x);
then, from /proc, the CPU time and thread switches a webhook cost each server's process,
with the CPU ratio paired repeat by repeat (steadier than the req/s on a shared machine).
The upstream's counters check that both made the same calls with the token, and the
state database that flowrunner recorded one run per request.

Then flowrunner alone runs under load once more while ``py-spy`` samples it (``pip
install py-spy``; without it, cProfile around the whole ``serve`` process), and the
profile is summarised by package and by function. See bench/README.md.

With ``--callgrind N``, nothing is timed: each server runs under valgrind's callgrind
and the instructions a webhook costs it are counted over N webhooks at one client, a
figure that does not move with the machine's load (wall and CPU time here move by ±10%
from run to run).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MeasurementFailed, median, table

SCRIPT = Path(__file__).resolve()
UPSTREAM = SCRIPT.parent / "upstream.py"
SERVER_CPU = 0
LOAD_CPU = 1  # the upstream and wrk
GOAL_THROUGHPUT = 0.7
GOAL_P99 = 2.0
WARMUP_SECONDS = 2
VARIANTS = ("flowrunner", "baseline")
PROFILE_NAME = "bench-api"
REQUEST_BODY = '{"customer": 7}'


# ---------------------------------------------------------------- the project


def write_project(root: Path, upstream_url: str) -> None:
    (root / "flows").mkdir(parents=True)
    (root / "auth_profiles").mkdir()
    (root / "auth_profiles" / f"{PROFILE_NAME}.yaml").write_text(
        f"""\
name: {PROFILE_NAME}
kind: bearer
token: ${{{{ secrets.BENCH_TOKEN }}}}
base_url: {upstream_url}
allowed_hosts: [127.0.0.1]
""",
        encoding="utf-8",
    )
    (root / "flows" / "w1.yaml").write_text(
        f"""\
name: w1
description: W1 - look the customer up, place an order, answer with its id
concurrency: {{limit: 1000}}
triggers:
  - webhook: {{path: w1, auth: none, respond: wait, timeout: 30s}}
steps:
  - id: customer
    http:
      method: GET
      url: /customers/${{{{ trigger.body.customer }}}}
      auth: {PROFILE_NAME}
  - id: order
    http:
      method: POST
      url: /orders
      auth: {PROFILE_NAME}
      json:
        customer_id: ${{{{ steps.customer.body.id }}}}
        email: ${{{{ steps.customer.body.email }}}}
        lines: [{{sku: A-1, qty: 2}}]
      expect: [201]
  - id: reply
    respond:
      status: 200
      json: {{order: "${{{{ steps.order.body.id }}}}"}}
""",
        encoding="utf-8",
    )
    # The global limit must not be what throttles 64 clients.
    (root / "flowrunner.yaml").write_text("server: {max_runs_in_flight: 256}\n")


# ---------------------------------------------------------------- the hand-written app


def serve_baseline(port: int, upstream_url: str, token: str) -> None:
    """W1 written by hand: Starlette under uvicorn (flowrunner's settings), aiohttp calls."""
    import contextlib
    from collections.abc import AsyncIterator

    import aiohttp
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    headers = {"Authorization": f"Bearer {token}", "User-Agent": "flowrunner"}
    json_type = {"Content-Type": "application/json"}
    session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal session
        connector = aiohttp.TCPConnector(limit=200, limit_per_host=0)
        session = aiohttp.ClientSession(connector=connector, headers=headers)
        try:
            yield
        finally:
            await session.close()

    async def w1(request: Request) -> JSONResponse:
        assert session is not None
        body = await request.json()
        async with session.get(f"{upstream_url}/customers/{body['customer']}") as response:
            if response.status != 200:
                return JSONResponse({"error": f"customer: {response.status}"}, 502)
            customer = await response.json()
        order = {
            "customer_id": customer["id"],
            "email": customer["email"],
            "lines": [{"sku": "A-1", "qty": 2}],
        }
        # Compact UTF-8 JSON, as flowrunner (and httpx) send it: the same bytes.
        data = json.dumps(order, separators=(",", ":"), ensure_ascii=False).encode()
        async with session.post(f"{upstream_url}/orders", data=data, headers=json_type) as response:
            if response.status != 201:
                return JSONResponse({"error": f"order: {response.status}"}, 502)
            created = await response.json()
        return JSONResponse({"order": created["id"]})

    app = Starlette(routes=[Route("/hooks/w1", w1, methods=["POST"])], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False)


def serve_profiled(output: Path, serve_args: list[str]) -> None:
    """``flowrunner serve`` under cProfile (when py-spy is missing); the profile is written
    when the server stops on SIGTERM."""
    import cProfile

    from flowrunner.cli import main as flowrunner_main

    sys.argv = ["flowrunner", *serve_args]
    profile = cProfile.Profile()
    profile.enable()
    try:
        flowrunner_main()
    except SystemExit:
        pass
    finally:
        profile.disable()
        profile.dump_stats(str(output))


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(command: list[str], cpu: int, pin: bool) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu), *command] if pin and taskset else command


class Process:
    """A child process that serves HTTP on 127.0.0.1:port; ready once ``ready_path`` answers."""

    def __init__(
        self,
        command: list[str],
        port: int,
        ready_path: str,
        *,
        cwd: Path | None = None,
        log: Path | None = None,
        ready_method: str = "GET",
        ready_within: float = 60,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        out = log.open("ab") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and scripts
            command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + ready_within
        while True:
            if self.process.poll() is not None:
                raise MeasurementFailed(f"{command} exited: {self.tail()}")
            try:
                status, _ = request(self.url, ready_method, ready_path, timeout=2)
                if status < 500:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise MeasurementFailed(
                    f"{command} did not answer within {ready_within:g} s: {self.tail()}"
                )
            time.sleep(0.1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log else ""

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def request(url: str, method: str, path: str, timeout: float = 5) -> tuple[int, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        body = REQUEST_BODY if method == "POST" else None
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def start_upstream(token: str, pin: bool) -> Process:
    port = free_port()
    command = [sys.executable, str(UPSTREAM), "--port", str(port), "--token", token]
    return Process(pinned(command, LOAD_CPU, pin), port, "/health")


def start_variant(
    variant: str,
    root: Path,
    upstream: Process,
    token: str,
    pin: bool,
    prefix: list[str],
    *,
    wrapper: Sequence[str] = (),
    ready_within: float = 60,
) -> Process:
    """Start one server. ``prefix`` replaces ``python -m flowrunner`` (a profiler's entry
    point); ``wrapper`` goes before the whole command of either server (valgrind)."""
    port = free_port()
    if variant == "flowrunner":
        command = [*prefix, "serve", "--port", str(port), "--log-format", "json"]
        if not prefix:
            command = [sys.executable, "-m", "flowrunner", *command]
    else:
        command = [sys.executable, str(SCRIPT), "--baseline-app", str(port), upstream.url, token]
    log = root.parent / f"{variant}.log"
    return Process(
        pinned([*wrapper, *command], SERVER_CPU, pin),
        port,
        "/hooks/w1",
        cwd=root,
        log=log,
        ready_method="POST",
        ready_within=ready_within,
    )


# ---------------------------------------------------------------- load


def wrk_script(workdir: Path) -> Path:
    path = workdir / "post.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{REQUEST_BODY}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _millis(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise MeasurementFailed(f"cannot read wrk's latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(
    url: str, clients: int, seconds: float, script: Path, pin: bool, wrk: str
) -> dict[str, Any]:
    command = pinned(
        [
            wrk, "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "--timeout", "30s",
            "-s", str(script), f"{url}/hooks/w1",
        ],
        LOAD_CPU,
        pin,
    )  # fmt: skip
    done = subprocess.run(  # noqa: S603 - wrk by absolute path, our own arguments
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    out = done.stdout
    if done.returncode != 0:
        raise MeasurementFailed(f"wrk failed: {done.stderr or out}")
    requests_match = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    if not (requests_match and rate and p50 and p99):
        raise MeasurementFailed(f"cannot read wrk's output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests": int(requests_match.group(1)),
        "rps": float(rate.group(1)),
        "p50_ms": _millis(p50.group(1)),
        "p99_ms": _millis(p99.group(1)),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def upstream_calls(upstream: Process) -> dict[str, dict[str, int]]:
    _status, stats = request(upstream.url, "GET", "/stats")
    return {k: stats.get(k, {}) for k in ("calls", "authorized")}


def state_counters(url: str) -> tuple[float, float]:
    """flowrunner's group commit so far, from /metrics: (transactions, writes carried)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = dict(
        line.split(" ", 1) for line in text.splitlines() if line.startswith("flowrunner_state_")
    )
    return float(values["flowrunner_state_commits"]), float(values["flowrunner_state_writes"])


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_usage(pid: int) -> tuple[float, int] | None:
    """The CPU seconds (user and system) all threads of a process have used, and the
    times they were switched off the CPU (voluntarily or not), from /proc; None where
    there is no /proc. A thread that ended took its count with it: the servers' threads
    live as long as they do."""
    seconds, switches = 0.0, 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in threads:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        switches += sum(
            int(line.split(":")[1]) for line in status.splitlines() if "ctxt_switches" in line
        )
    return seconds, switches


def stored_runs(root: Path) -> collections.Counter[str]:
    with sqlite3.connect(root / ".flowrunner" / "state.db") as conn:
        return collections.Counter(
            status for (status,) in conn.execute("SELECT status FROM runs WHERE flow = 'w1'")
        )


def measure_variant(
    variant: str,
    root: Path,
    upstream: Process,
    token: str,
    args: argparse.Namespace,
    script: Path,
    wrk: str,
) -> dict[int, dict[str, Any]]:
    runs_before = sum(stored_runs(root).values()) if (root / ".flowrunner").exists() else 0
    calls_before = upstream_calls(upstream)
    server = start_variant(variant, root, upstream, token, args.pin, [])
    results: dict[int, dict[str, Any]] = {}
    try:
        run_wrk(server.url, 16, WARMUP_SECONDS, script, args.pin, wrk)
        for clients in args.clients:
            before = state_counters(server.url) if variant == "flowrunner" else None
            usage_before = process_usage(server.process.pid)
            result = run_wrk(server.url, clients, args.duration, script, args.pin, wrk)
            usage_after = process_usage(server.process.pid)
            if result["non_2xx"] or result["socket_errors"]:
                raise MeasurementFailed(f"{variant} at {clients} clients: {result}")
            if usage_before and usage_after and result["requests"]:
                # Requests still in flight when wrk stops are few beside thousands.
                result["cpu_us"] = (usage_after[0] - usage_before[0]) / result["requests"] * 1e6
                result["switches"] = (usage_after[1] - usage_before[1]) / result["requests"]
            if before is not None:
                (commits_after, writes_after), (commits_before, writes_before) = (
                    state_counters(server.url),
                    before,
                )
                commits, writes = commits_after - commits_before, writes_after - writes_before
                result["writes_per_commit"] = writes / commits if commits else 0.0
            results[clients] = result
    finally:
        # Requests in flight when wrk stops still finish: count calls once the server is down.
        code = server.stop()
    calls_after = upstream_calls(upstream)

    def made(section: str, name: str) -> int:
        return calls_after[section].get(name, 0) - calls_before[section].get(name, 0)

    for name in ("GET /customers", "POST /orders"):
        if made("calls", name) != made("authorized", name):
            raise MeasurementFailed(f"{variant}: {name} calls without the bearer token")
    if made("calls", "GET /customers") != made("calls", "POST /orders"):
        raise MeasurementFailed(f"{variant}: customers and orders do not pair up")
    results[0] = {"orders": made("calls", "POST /orders")}
    if variant == "flowrunner":
        if code != 0:
            raise MeasurementFailed(f"flowrunner serve exited {code}: {server.tail()}")
        runs = stored_runs(root)
        new_runs = sum(runs.values()) - runs_before
        if new_runs != results[0]["orders"] or set(runs) != {"succeeded"}:
            raise MeasurementFailed(
                f"the run history holds {new_runs} new runs ({dict(runs)}) for "
                f"{results[0]['orders']} orders placed"
            )
        results[0]["runs"] = new_runs
    return results


# ---------------------------------------------------------------- profile


def profile_flowrunner(
    root: Path, upstream: Process, token: str, args: argparse.Namespace, script: Path, wrk: str
) -> str:
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    prefix: list[str] = []
    cprofile_out = root.parent / "serve.prof"
    if py_spy is None:
        prefix = [sys.executable, str(SCRIPT), "--serve-profiled", str(cprofile_out), "--"]
    server = start_variant("flowrunner", root, upstream, token, args.pin, prefix)
    try:
        run_wrk(server.url, args.profile_clients, WARMUP_SECONDS, script, args.pin, wrk)
        sampler = None
        raw = root.parent / "py-spy.txt"
        if py_spy is not None:
            sampler = subprocess.Popen(  # noqa: S603 - py-spy by absolute path
                [
                    py_spy, "record", "--pid", str(server.process.pid), "--duration",
                    str(int(args.profile_seconds)), "--rate", "250", "--format", "raw",
                    "--nonblocking", "--output", str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        load = run_wrk(
            server.url, args.profile_clients, args.profile_seconds, script, args.pin, wrk
        )
        if sampler is not None:
            _out, err = sampler.communicate(timeout=args.profile_seconds + 60)
            if sampler.returncode != 0 or not raw.exists():
                return f"py-spy failed ({sampler.returncode}): {err[-2000:]}"
    finally:
        server.stop()
    head = (
        f"under load: {args.profile_clients} clients, {load['rps']:.0f} req/s while sampled "
        f"({'py-spy, 250 Hz, non-blocking' if py_spy else 'cProfile: overhead included'})\n"
    )
    if py_spy is not None:
        return head + summarise_collapsed(raw.read_text(), args.top)
    from _common import profile_report

    return head + profile_report(_load_stats(cprofile_out), top=args.top)


def _load_stats(path: Path) -> Any:
    import pstats

    return pstats.Stats(str(path))


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _package(file: str) -> str:
    """py-spy names files relative to sys.path (``sqlalchemy/engine/base.py``,
    ``asyncio/events.py``): the first component is the package; flowrunner's modules keep
    their path, to be told apart."""
    path = file.replace("\\", "/").rsplit("site-packages/", 1)[-1]
    if path.startswith("flowrunner/") or "/flowrunner/" in path:
        return "flowrunner/" + path.rsplit("flowrunner/", 1)[1]
    return path.split("/", 1)[0].removesuffix(".py")


def _where(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if not match:
        return frame, frame
    file = match.group("file")
    package = _package(file)
    short = file.rsplit("site-packages/", 1)[-1]
    if "/flowrunner/" in short:
        short = "flowrunner/" + short.rsplit("/flowrunner/", 1)[1]
    return f"{match.group('function')} ({short})", package


# The frames that start the server: on every stack, they say nothing about where time goes.
_LAUNCHER = ("flowrunner/cli.py", "flowrunner/__main__.py", "flowrunner/server.py")


def summarise_collapsed(text: str, top: int) -> str:
    """py-spy's raw (collapsed) stacks → shares by area, by package (own time), and by
    function (own time; inclusive time for flowrunner's functions)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    by_area: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        located = [_where(f) for f in frames]
        leaf, leaf_package = located[-1]
        own[leaf] += count
        by_package[leaf_package.split("/", 1)[0]] += count
        for name, package in set(located):
            if package.startswith("flowrunner/") and not package.startswith(_LAUNCHER):
                inclusive[name] += count
        by_area[_area(located)] += count
    if not total:
        return "no samples"

    def rows(counter: collections.Counter[str], limit: int) -> list[tuple[str, str, str]]:
        return [
            (name, str(count), f"{100 * count / total:.1f}%")
            for name, count in counter.most_common(limit)
        ]

    return "\n\n".join(
        [
            f"{total} samples of the server process (idle time in the event loop excluded)",
            "where the time goes (the innermost flowrunner module on the stack; "
            "→ SQLAlchemy/SQLite: spent in the database layer on its behalf):\n"
            + table(("area", "samples", "share"), rows(by_area, 20)),
            "own time by package:\n" + table(("package", "samples", "share"), rows(by_package, 15)),
            f"top {top} functions by own time:\n"
            + table(("function", "samples", "share"), rows(own, top)),
            f"top {top} flowrunner functions by inclusive time:\n"
            + table(("function", "samples", "share"), rows(inclusive, top)),
        ]
    )


_AREAS = (
    ("flowrunner/store/batch.py", "state store: group commit (intake, history, queue)"),
    ("flowrunner/store/database.py", "state store: group commit (intake, history, queue)"),
    ("flowrunner/store/queue.py", "state store: run queue (intake, claim, finish)"),
    ("flowrunner/store/runs.py", "state store: run history"),
    ("flowrunner/history.py", "state store: run history"),
    ("flowrunner/dispatcher.py", "dispatcher"),
    ("flowrunner/webhooks.py", "webhook intake"),
    ("flowrunner/steps/http.py", "http step"),
    ("flowrunner/wire.py", "http step: the wire (aiohttp requests)"),
    ("flowrunner/engine.py", "engine"),
    ("flowrunner/runtime.py", "engine"),
    ("flowrunner/expressions.py", "expressions"),
    ("flowrunner/auth", "auth profiles"),
    ("flowrunner/secrets.py", "secrets and masking"),
    ("flowrunner/", "engine and the rest of flowrunner"),
)


def _area(located: list[tuple[str, str]]) -> str:
    """The innermost flowrunner module of a stack, or, when the stack holds only the
    frames that start the server, the HTTP server and event loop (by the leaf's package)."""
    leaf_package = located[-1][1].split("/", 1)[0]
    for _name, package in reversed(located):
        if package.startswith(_LAUNCHER):
            break
        for prefix, area in _AREAS:
            if package.startswith(prefix):
                if leaf_package in ("sqlalchemy", "sqlite3"):
                    return f"{area} → SQLAlchemy/SQLite"
                return area
    return f"HTTP server and event loop: {leaf_package}"


# ---------------------------------------------------------------- instructions

CALLGRIND_WARMUP = 200
CALLGRIND_READY_SECONDS = 600  # an interpreter under valgrind starts about 50 times slower


def count_instructions(
    variant: str, root: Path, upstream: Process, token: str, args: argparse.Namespace
) -> dict[str, float]:
    """Instructions a webhook costs the server, counted by valgrind's callgrind: the same
    count whatever else the machine does, where wall and CPU time here move by ±10%. One
    client sends ``args.callgrind`` webhooks one after the other, after a warm-up; the
    counters are zeroed between the two. By thread: the event loop's, and flowrunner's
    writer and checkpoint threads. Cache misses and context switches are not counted."""
    out = root.parent / f"callgrind.{variant}"
    wrapper = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        "--separate-threads=yes", "--dump-instr=no",
    ]  # fmt: skip
    server = start_variant(
        variant, root, upstream, token, args.pin, [], wrapper=wrapper,
        ready_within=CALLGRIND_READY_SECONDS,
    )  # fmt: skip
    pid = str(server.process.pid)  # taskset execs valgrind: the same process
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)

        def send(count: int) -> None:
            for _ in range(count):
                conn.request(
                    "POST", "/hooks/w1", body=REQUEST_BODY,
                    headers={"Content-Type": "application/json"},
                )  # fmt: skip
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise MeasurementFailed(f"{variant} answered {response.status}")

        send(CALLGRIND_WARMUP)
        subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)  # noqa: S603, S607
        send(args.callgrind)
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)  # noqa: S603, S607
        conn.close()
    finally:
        server.stop()
    threads: dict[str, float] = {}
    for dump in sorted(out.parent.glob(f"{out.name}.1-*")):  # the dump, one file a thread
        match = re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.MULTILINE)
        if match and int(match.group(1)):
            threads[f"thread {dump.name.rsplit('-', 1)[-1]}"] = int(match.group(1)) / args.callgrind
    if not threads:
        raise MeasurementFailed(f"callgrind wrote no counts for {variant}: {server.tail()}")
    return threads


def run_callgrind(args: argparse.Namespace, root: Path, upstream: Process, token: str) -> None:
    counted = {
        variant: count_instructions(variant, root, upstream, token, args) for variant in VARIANTS
    }
    totals = {variant: sum(threads.values()) for variant, threads in counted.items()}
    rows = [
        (variant, f"{totals[variant]:,.0f}", f"{totals[variant] / totals['baseline']:.2f}x",
         ", ".join(f"{name} {count:,.0f}" for name, count in threads.items()))
        for variant, threads in counted.items()
    ]  # fmt: skip
    print()
    print(table(("server", "instructions a webhook", "ratio", "by thread"), rows))
    print(
        f"one client, {args.callgrind} webhooks after {CALLGRIND_WARMUP} of warm-up, under "
        "valgrind's callgrind; thread 01 is the event loop's. Under valgrind the server runs "
        "about 50 times slower, so flowrunner's timed threads (the checkpoint every 50 ms) "
        "weigh more than they do at full speed."
    )


# ---------------------------------------------------------------- the parent


def run(args: argparse.Namespace) -> int:
    wrk = shutil.which("wrk")
    if wrk is None and not args.callgrind:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    if args.callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    token = "bench-" + secrets.token_urlsafe(24)
    os.environ["BENCH_TOKEN"] = token  # flowrunner reads it as secrets.BENCH_TOKEN
    os.environ.setdefault("FLOWRUNNER_SECRET_KEY", "bench-webhooks")
    args.pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    what = (
        f"instructions over {args.callgrind} webhooks at one client"
        if args.callgrind
        else f"{args.duration:g} s per level at {args.clients} clients, {args.repeat} repeat(s)"
    )
    print(
        f"W1 webhook benchmark: {what}; python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; "
        + (
            f"servers pinned to CPU {SERVER_CPU}, upstream and wrk to CPU {LOAD_CPU}"
            if args.pin
            else "no pinning"
        )
    )
    print(f"load average before: {os.getloadavg()[0]:.2f} (a shared machine: figures are noisy)")
    workdir = Path(tempfile.mkdtemp(prefix="flowrunner-bench-webhooks-"))
    upstream: Process | None = None
    try:
        upstream = start_upstream(token, args.pin)
        root = workdir / "project"
        write_project(root, upstream.url)
        script = wrk_script(workdir)
        if args.callgrind:
            run_callgrind(args, root, upstream, token)
            return 0
        assert wrk is not None  # checked above: only callgrind runs without it
        results: dict[str, list[dict[int, dict[str, Any]]]] = {v: [] for v in VARIANTS}
        for repeat in range(args.repeat):
            order = VARIANTS if repeat % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                measured = measure_variant(variant, root, upstream, token, args, script, wrk)
                results[variant].append(measured)
                print(
                    f"  repeat {repeat + 1} {variant}: "
                    + ", ".join(
                        f"{c} clients {measured[c]['rps']:.0f} req/s "
                        f"p99 {measured[c]['p99_ms']:.1f} ms"
                        for c in args.clients
                    )
                    + (f"; {measured[0]['runs']} runs recorded" if "runs" in measured[0] else "")
                )
        print_results(results, args)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if not args.no_profile:
            print("\nprofile of flowrunner serve under load")
            print(profile_flowrunner(root, upstream, token, args, script, wrk))
    except MeasurementFailed as exc:
        print(f"measurement failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if upstream is not None:
            upstream.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def print_results(
    results: dict[str, list[dict[int, dict[str, Any]]]], args: argparse.Namespace
) -> None:
    rows = []
    for clients in args.clients:

        def med(variant: str, key: str, clients: int = clients) -> float:
            return median([r[clients][key] for r in results[variant]])

        fr_rps, base_rps = med("flowrunner", "rps"), med("baseline", "rps")
        fr_p99, base_p99 = med("flowrunner", "p99_ms"), med("baseline", "p99_ms")
        met = fr_rps / base_rps >= GOAL_THROUGHPUT and fr_p99 / base_p99 < GOAL_P99
        rows.append(
            (
                str(clients),
                f"{fr_rps:.0f}",
                f"{med('flowrunner', 'p50_ms'):.1f}",
                f"{fr_p99:.1f}",
                f"{base_rps:.0f}",
                f"{med('baseline', 'p50_ms'):.1f}",
                f"{base_p99:.1f}",
                f"{fr_rps / base_rps:.2f}x",
                f"{fr_p99 / base_p99:.2f}x",
                "yes" if met else "NO",
                f"{med('flowrunner', 'writes_per_commit'):.1f}",
            )
        )
    print()
    print(
        table(
            (
                "clients",
                "flowrunner req/s",
                "p50 ms",
                "p99 ms",
                "baseline req/s",
                "p50 ms",
                "p99 ms",
                "req/s ratio",
                "p99 ratio",
                "goal met",
                "writes/commit",
            ),
            rows,
        )
    )
    print(
        f"goal: req/s ratio >= {GOAL_THROUGHPUT}x and p99 ratio < {GOAL_P99}x; medians of "
        f"{args.repeat} repeat(s); flowrunner with durable intake and run history (SQLite); "
        "writes/commit = intakes, run ends and removals from the queue per transaction of "
        "flowrunner's group commit "
        "(from its /metrics)"
    )
    if all("cpu_us" in r[c] for v in VARIANTS for r in results[v] for c in args.clients):
        print_usage(results, args)


def print_usage(
    results: dict[str, list[dict[int, dict[str, Any]]]], args: argparse.Namespace
) -> None:
    """What a webhook cost each server's process: CPU time and thread switches (what an
    instruction count leaves out), and the CPU ratio paired repeat by repeat, which
    moves less with the machine's load than the medians do."""
    rows = []
    for clients in args.clients:
        pairs = list(zip(results["flowrunner"], results["baseline"], strict=True))
        paired = [fr[clients]["cpu_us"] / base[clients]["cpu_us"] for fr, base in pairs]
        rows.append(
            (
                str(clients),
                f"{median([fr[clients]['cpu_us'] for fr, _ in pairs]):.0f}",
                f"{median([fr[clients]['switches'] for fr, _ in pairs]):.1f}",
                f"{median([base[clients]['cpu_us'] for _, base in pairs]):.0f}",
                f"{median([base[clients]['switches'] for _, base in pairs]):.1f}",
                f"{median(paired):.2f}x",
            )
        )
    print()
    print(
        table(
            (
                "clients",
                "flowrunner CPU us",
                "switches",
                "baseline CPU us",
                "switches",
                "CPU ratio (paired)",
            ),
            rows,
        )
    )
    print(
        "a webhook's CPU time (user and system, all threads of the server) and thread "
        "switches, from /proc; medians of the repeats"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure (median)")
    parser.add_argument("--profile-seconds", type=float, default=10)
    parser.add_argument("--profile-clients", type=int, default=16)
    parser.add_argument("--top", type=int, default=20, help="profile entries shown")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the project and logs")
    parser.add_argument(
        "--callgrind",
        type=int,
        metavar="N",
        default=0,
        help="count instructions a webhook (valgrind) over N webhooks, instead of timing",
    )
    # Internal: the hand-written app, and serve under cProfile.
    parser.add_argument("--baseline-app", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-profiled", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.baseline_app:
        port, upstream_url, token = args.baseline_app
        serve_baseline(int(port), upstream_url, token)
        return 0
    if args.serve_profiled:
        serve_profiled(args.serve_profiled, [a for a in rest if a != "--"])
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.duration <= 0 or args.repeat < 1 or min(args.clients) < 1:
        parser.error("--duration, --repeat and --clients must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
