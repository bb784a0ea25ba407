"""Auth benchmark: what applying a cached token costs a request, side by side with no profile.

    python bench/auth.py [--requests 10000] [--concurrency 32] [--repeat 3] [--no-pin]

``--requests`` authenticated GETs per variant against a local upstream server
(bench/upstream.py, its own process, pinned to CPU 1 with ``taskset`` when there are two
CPUs), ``--concurrency`` at a time. Two levels, each measured in a fresh Python process
(pinned to CPU 0) per repeat:

- ``send``: the wire path of the http step. ``send:header`` is ``wire.send(request)``
  with the ``Authorization`` header set by hand; ``send:oauth2`` and ``send:bearer`` send
  the same request with the auth that ``ProfileAuth.auth_for`` gives, through
  ``send_with_auth`` (what the http step does for every attempt): for an oauth2 profile
  whose token is in the state database (RefreshingAuth: the TokenManager's cached token
  and its refresh deadline, the header, status upkeep), and for a bearer profile
  (BearerAuth: the configured token read again, its expiry check, the 401 watch);
- ``flow``: ``engine.run`` of a one-step flow, run history off. ``flow:header`` writes the
  header literally in ``headers:``; ``flow:oauth2`` / ``flow:bearer`` say ``auth:`` instead;
  ``flow:secret`` (for reference) writes ``Bearer ${{ secrets.BENCH_TOKEN }}``, a header
  that flowrunner must mask in the run record, as it masks a profile's token.

Within one process the variants of a level run interleaved, in chunks of
``--chunk`` requests whose order rotates, so that they share the machine's conditions
(the development machines are 2 shared, noisy cores): the overhead of a variant is its
time over ``header``'s in the same process, and the figure reported is the median over
``--repeat`` processes, for wall time and for the measuring process's CPU time (the
steadier of the two when other processes compete for the cores). Goal: under 5%.
The upstream's counters check that every request carried the token. No token call is
made: the oauth2 token is stored before the measurement, as an earlier run would have.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MeasurementFailed, emit, median, run_child, table
from engine import Upstream  # the same upstream process, started the same way

SCRIPT = Path(__file__).resolve()
GOAL_PERCENT = 5.0
WARM_UP = 300
KINDS = {"send": ("header", "oauth2", "bearer"), "flow": ("header", "secret", "oauth2", "bearer")}
MEASURE_CPU = 0
SECRET_KEY = "bench-auth-secret-key"  # noqa: S105 - encrypts a throwaway state database
PATH = "/customers/1"


# ---------------------------------------------------------------- the project


def write_project(root: Path, base_url: str, token: str) -> None:
    (root / "auth_profiles").mkdir(parents=True)
    (root / "flows").mkdir()
    (root / "auth_profiles" / "bench-oauth2.yaml").write_text(
        f"""\
name: bench-oauth2
kind: oauth2
grant: client_credentials
base_url: {base_url}
token_url: {base_url}/oauth/token
client_id: bench
client_secret: ${{{{ secrets.BENCH_CLIENT_SECRET }}}}
"""
    )
    (root / "auth_profiles" / "bench-bearer.yaml").write_text(
        f"""\
name: bench-bearer
kind: bearer
token: ${{{{ secrets.BENCH_TOKEN }}}}
base_url: {base_url}
"""
    )
    flows = {
        "bench-header": f"headers: {{Authorization: Bearer {token}}}",
        "bench-secret": 'headers: {Authorization: "Bearer ${{ secrets.BENCH_TOKEN }}"}',
        "bench-oauth2": "auth: bench-oauth2",
        "bench-bearer": "auth: bench-bearer",
    }
    for name, how in flows.items():
        (root / "flows" / f"{name}.yaml").write_text(
            f"name: {name}\nsteps:\n  - id: get\n    http:\n"
            f"      url: {base_url}{PATH}\n      {how}\n"
        )
    (root / ".env").write_text(f"BENCH_TOKEN={token}\nBENCH_CLIENT_SECRET=not-used\n")


def store_token(root: Path, token: str) -> None:
    """The oauth2 profile's token, as an earlier run would have left it: valid for a day."""
    from flowrunner.app import database_url, token_store
    from flowrunner.loader import load_project
    from flowrunner.store.database import Database
    from flowrunner.store.tokens import Credential

    project = load_project(root)
    if project.problems:
        raise MeasurementFailed(f"the benchmark project does not load: {project.problems[:3]}")
    database = Database.open(database_url(project))
    try:
        expires = datetime.now(UTC) + timedelta(days=1)
        token_store(project, database).save(Credential("bench-oauth2", token, expires))
    finally:
        database.close()


# ---------------------------------------------------------------- in the measuring process


async def _drive(count: int, concurrency: int, one: Callable[[], Awaitable[None]]) -> None:
    """``count`` calls of ``one()``, ``concurrency`` at a time."""
    left = iter(range(count))

    async def worker() -> None:
        for _ in left:  # a shared iterator: each call is taken by one worker
            await one()

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, count)):
            group.create_task(worker())


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from multidict import CIMultiDict
    from yarl import URL

    from flowrunner.app import build_runtime
    from flowrunner.runtime import RunContext
    from flowrunner.secrets import Masker
    from flowrunner.wire import WireRequest, send_with_auth

    level = args.level
    token = os.environ["BENCH_TOKEN"]
    runtime = build_runtime(args.project, keep_history=False)
    client, wire, auth, engine = runtime.client, runtime.wire, runtime.auth, runtime.engine
    url = URL(f"{args.base_url}{PATH}")
    limit = 10 * 1024 * 1024

    async def nothing(*_args: Any) -> Any:
        return None

    def new_run() -> RunContext:
        """Each request stands for a run of its own: a context and a masker, as the engine
        makes for every run whether it uses a profile or not."""
        return RunContext(
            run_id="bench",
            flow_name="bench",
            started_at=datetime.now(UTC),
            masker=Masker(),
            client=client,
            wire=wire,
            auth=auth,
            run_steps=nothing,
            call_flow=nothing,
        )

    def sender(kind: str) -> Callable[[], Awaitable[None]]:
        async def by_hand() -> None:
            new_run()
            headers = CIMultiDict({"Authorization": f"Bearer {token}"})
            check(await wire.send(WireRequest("GET", url, headers), limit))

        async def with_profile() -> None:
            # What the http step does for each attempt: auth_for, then send with it.
            run = new_run()
            request = WireRequest("GET", url, CIMultiDict())
            flow = await auth.auth_for(f"bench-{kind}", run)
            check(await send_with_auth(wire, request, flow, limit))

        return by_hand if kind == "header" else with_profile

    def check(response: Any) -> None:
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: {response.status_code}")

    def runner(kind: str) -> Callable[[], Awaitable[None]]:
        async def run_flow() -> None:
            record = await engine.run(f"bench-{kind}", trigger={})
            if record.status != "succeeded":
                raise RuntimeError(f"bench-{kind}: {record.error}")

        return run_flow

    kinds = KINDS[level]
    calls = {kind: (sender(kind) if level == "send" else runner(kind)) for kind in kinds}
    for kind in kinds:
        await _drive(WARM_UP, args.concurrency, calls[kind])
    wall = dict.fromkeys(kinds, 0.0)
    cpu = dict.fromkeys(kinds, 0.0)
    done = dict.fromkeys(kinds, 0)
    chunk = 0
    while done[kinds[0]] < args.requests:  # bounded: every pass adds a chunk to each kind
        size = min(args.chunk, args.requests - done[kinds[0]])
        rotation = kinds[chunk % len(kinds) :] + kinds[: chunk % len(kinds)]
        for kind in rotation:
            used = time.process_time()
            start = time.perf_counter()
            await _drive(size, args.concurrency, calls[kind])
            wall[kind] += time.perf_counter() - start
            cpu[kind] += time.process_time() - used
            done[kind] += size
        chunk += 1
    await runtime.aclose()
    return {"wall": wall, "cpu": cpu, "requests": done}


def measure(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one level, its variants interleaved; prints JSON."""
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    import flowrunner.app  # noqa: F401 - imported before the timing

    result = asyncio.run(_measure(args))
    result["level"] = args.level
    emit(result)


# ---------------------------------------------------------------- the upstream server


# ---------------------------------------------------------------- the parent process


def _count(stats: dict[str, dict[str, int]], section: str) -> int:
    return stats.get(section, {}).get("GET /customers", 0)


def run(args: argparse.Namespace) -> int:
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    token = secrets.token_urlsafe(32)
    while token.startswith("-"):  # it goes on the upstream's command line
        token = secrets.token_urlsafe(32)
    os.environ["FLOWRUNNER_SECRET_KEY"] = SECRET_KEY
    os.environ["BENCH_TOKEN"] = token
    workdir = Path(tempfile.mkdtemp(prefix="flowrunner-bench-auth-"))
    upstream = Upstream(token, pin)
    results: dict[str, list[dict[str, Any]]] = {level: [] for level in KINDS}
    try:
        root = workdir / "project"
        write_project(root, upstream.base_url, token)
        store_token(root, token)
        print(
            f"{args.requests} GET {PATH} per variant, {args.concurrency} at a time, "
            f"interleaved in chunks of {args.chunk} (+{WARM_UP} warm-up each), "
            f"{args.repeat} repeat(s); upstream "
            f"{'pinned to CPU 1' if upstream.pinned else 'not pinned'}, measuring process "
            f"{'on CPU 0' if pin else 'not pinned'}",
            flush=True,
        )
        for repeat in range(args.repeat):
            levels = list(KINDS) if repeat % 2 == 0 else list(reversed(KINDS))
            for level in levels:
                before = upstream.stats()
                child = [
                    "--child", "--level", level, "--project", str(root),
                    "--base-url", upstream.base_url, "--requests", str(args.requests),
                    "--concurrency", str(args.concurrency), "--chunk", str(args.chunk),
                ]  # fmt: skip
                if pin:
                    child += ["--cpu", str(MEASURE_CPU)]
                result, _ = run_child(SCRIPT, child)
                after = upstream.stats()
                expected = (args.requests + WARM_UP) * len(KINDS[level])
                calls = _count(after, "calls") - _count(before, "calls")
                authorized = _count(after, "authorized") - _count(before, "authorized")
                if calls != expected or authorized != expected:
                    raise MeasurementFailed(
                        f"{level}: {calls} calls, {authorized} with the token; "
                        f"expected {expected} of each"
                    )
                results[level].append(result)
                line = "  ".join(
                    f"{kind} {result['wall'][kind]:.2f}s/{result['cpu'][kind]:.2f}s cpu"
                    for kind in KINDS[level]
                )
                print(f"  run {repeat + 1} {level}: {line}", flush=True)
    finally:
        upstream.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(report(results, args.requests))
    return 0


def report(results: dict[str, list[dict[str, Any]]], requests: int) -> str:
    """The table, and the verdict for each profile against the header written by hand."""
    rows = []
    verdicts = []
    for level, kinds in KINDS.items():
        runs = results[level]
        for kind in kinds:
            wall = median([r["wall"][kind] for r in runs])
            cpu = median([r["cpu"][kind] for r in runs])
            over_wall = median([100 * (r["wall"][kind] / r["wall"]["header"] - 1) for r in runs])
            over_cpu = median([100 * (r["cpu"][kind] / r["cpu"]["header"] - 1) for r in runs])
            per_request = median(
                [1e6 * (r["cpu"][kind] - r["cpu"]["header"]) / requests for r in runs]
            )
            first = kind == "header"
            rows.append(
                (
                    f"{level}:{kind}",
                    f"{wall:.3f}",
                    f"{requests / wall:,.0f}",
                    f"{cpu:.3f}",
                    "-" if first else f"{over_wall:+.1f}%",
                    "-" if first else f"{over_cpu:+.1f}%",
                    "-" if first else f"{per_request:+.1f}",
                    " ".join(
                        f"{100 * (r['cpu'][kind] / r['cpu']['header'] - 1):+.1f}" for r in runs
                    )
                    if not first
                    else "",
                )
            )
            if kind in ("oauth2", "bearer"):
                verdicts.append((f"{level}:{kind}", over_wall, over_cpu))
    lines = [
        table(
            (
                "variant",
                "wall s",
                "req/s",
                "cpu s",
                "wall overhead",
                "cpu overhead",
                "cpu µs/req",
                "cpu overhead per run (%)",
            ),
            rows,
        ),
        "",
    ]
    for variant, over_wall, over_cpu in verdicts:
        met = "met" if max(over_wall, over_cpu) < GOAL_PERCENT else "NOT met"
        lines.append(
            f"{variant}: {over_wall:+.1f}% wall, {over_cpu:+.1f}% CPU over the header written "
            f"by hand: goal <{GOAL_PERCENT:g}% {met}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=500, help="requests per interleaved chunk")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the generated project")
    # The measuring child's own arguments.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--level", choices=tuple(KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--project", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.repeat, args.chunk) < 1:
        parser.error("--requests, --concurrency, --repeat and --chunk must be at least 1")
    if args.child:
        measure(args)
        return 0
    try:
        return run(args)
    except MeasurementFailed as exc:
        print(f"measurement failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
