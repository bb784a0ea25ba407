"""Engine benchmark: flowrunner against a hand-written aiohttp script, same calls, same run.

    python bench/engine.py [--runs 2000] [--in-flight 32] [--items 1000] [--concurrency 10]
                           [--repeat 3] [--profile] [--profile-workload a b] [--no-pin]

Two workloads against a local upstream server (bench/upstream.py, its own process):

(a) a 3-step flow (GET a customer with a bearer token and JSONPath outputs, POST an order
    whose JSON body is built from expressions over the first step, a ``set`` step), run
    ``--runs`` times with ``--in-flight`` runs at a time;
(b) one run of a flow that GETs ``--items`` ids and POSTs a card per id in a ``for_each``
    at ``--concurrency``.

Goal: flowrunner, run history included, within 1.3x of the wall time of a hand-written
asyncio script doing the same HTTP calls with plain aiohttp (one ClientSession, the same
headers and bearer token, JSON parsing of every response, the same concurrency). Each
measurement is a fresh Python process running one variant (baseline, flowrunner with
history, flowrunner without history); the order of the variants alternates across
repeats, and the figures are medians. The upstream server's call counters check that
every variant made exactly the same calls (count, bearer token, request body bytes).
With two or more CPUs the measuring process is pinned to CPU 0 and the upstream to CPU 1.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    MeasurementFailed,
    emit,
    median,
    profile_report,
    run_child,
    table,
)

from flowrunner import __version__  # the package's __init__ only: no import cost to speak of

SCRIPT = Path(__file__).resolve()
UPSTREAM = SCRIPT.parent / "upstream.py"
GOAL_RATIO = 1.3
VARIANTS = ("baseline", "flowrunner", "flowrunner-nohistory")
WORKLOADS = ("a", "b")
WORKLOAD_TITLES = {"a": "(a) 3-step flow", "b": "(b) for_each"}
PROFILE_NAME = "bench-api"
FLOW_A = "bench-three-steps"
FLOW_B = "bench-for-each"
USER_AGENT = f"flowrunner/{__version__}"  # what flowrunner sends; the baseline sends it too
MEASURE_CPU = 0
UPSTREAM_CPU = 1
_SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"]).resolve()
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


# ---------------------------------------------------------------- the project


def profile_yaml(base_url: str) -> str:
    return f"""\
name: {PROFILE_NAME}
description: Bearer token of the benchmark's upstream
kind: bearer
token: ${{{{ secrets.BENCH_TOKEN }}}}
base_url: {base_url}
allowed_hosts: [127.0.0.1]
"""


FLOW_A_YAML = f"""\
name: {FLOW_A}
description: GET a customer, POST an order built from it, compute a summary
inputs:
  customer: {{type: integer, default: 1}}
steps:
  - id: customer
    http:
      method: GET
      url: /customers/${{{{ inputs.customer }}}}
      auth: {PROFILE_NAME}
    outputs:
      email: $.email
      tier: $.tier
  - id: order
    http:
      method: POST
      url: /orders
      auth: {PROFILE_NAME}
      json:
        customer_id: ${{{{ steps.customer.body.id }}}}
        email: ${{{{ steps.customer.outputs.email }}}}
        tier: ${{{{ steps.customer.outputs.tier }}}}
        note: "Order for ${{{{ steps.customer.body.name }}}}"
        lines: [{{sku: A-1, qty: 2}}]
      expect: [201]
    outputs:
      order_id: $.id
  - id: summary
    set:
      order: ${{{{ steps.order.outputs.order_id }}}}
      label: "${{{{ steps.customer.body.name }}}} / ${{{{ steps.order.outputs.order_id }}}}"
"""


def flow_b_yaml(concurrency: int) -> str:
    return f"""\
name: {FLOW_B}
description: GET a list of ids, POST a card per id
inputs:
  n: {{type: integer, default: 1000}}
steps:
  - id: items
    http:
      method: GET
      url: /items
      auth: {PROFILE_NAME}
      query: {{n: "${{{{ inputs.n }}}}"}}
    outputs:
      ids: "$.data[*].id"
  - id: cards
    for_each: ${{{{ steps.items.outputs.ids }}}}
    concurrency: {concurrency}
    steps:
      - id: card
        http:
          method: POST
          url: /cards
          auth: {PROFILE_NAME}
          json:
            title: "Card ${{{{ item }}}}"
            position: ${{{{ index }}}}
            item: ${{{{ item }}}}
          expect: [201]
"""


def write_project(root: Path, base_url: str, concurrency: int) -> None:
    (root / "auth_profiles").mkdir(parents=True)
    (root / "flows").mkdir()
    (root / "auth_profiles" / f"{PROFILE_NAME}.yaml").write_text(
        profile_yaml(base_url), encoding="utf-8"
    )
    (root / "flows" / f"{FLOW_A}.yaml").write_text(FLOW_A_YAML, encoding="utf-8")
    (root / "flows" / f"{FLOW_B}.yaml").write_text(flow_b_yaml(concurrency), encoding="utf-8")


# ---------------------------------------------------------------- in the measuring process


def _max_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


async def _drive(runs: int, in_flight: int, one: Callable[[int], Awaitable[None]]) -> None:
    """``runs`` calls of ``one(i)``, ``in_flight`` at a time: the same driver for all variants."""
    indexes = iter(range(runs))

    async def worker() -> None:
        for index in indexes:  # shared iterator: each index is taken by one worker
            await one(index)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(in_flight, runs)):
            group.create_task(worker())


async def _baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The hand-written script: the same calls with plain aiohttp."""
    import aiohttp

    token = os.environ["BENCH_TOKEN"]
    base = args.base_url
    connector = aiohttp.TCPConnector(limit=200)
    session = aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT, "Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=30),
    )
    post_headers = {"Content-Type": "application/json"}

    async def get_json(url: str, **kwargs: Any) -> Any:
        async with session.get(url, **kwargs) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {url}: {response.status}")
            return await response.json()

    async def post_json(url: str, body: Any) -> Any:
        # Compact UTF-8 JSON, as flowrunner (and httpx) send it: the same bytes on the wire.
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        async with session.post(url, data=data, headers=post_headers) as response:
            if response.status != 201:
                raise RuntimeError(f"POST {url}: {response.status}")
            return await response.json()

    summaries: list[dict[str, Any]] = []

    async def three_steps(index: int) -> None:
        customer = await get_json(f"{base}/customers/{index + 1}")
        email, tier = customer["email"], customer["tier"]
        order = await post_json(
            f"{base}/orders",
            {
                "customer_id": customer["id"],
                "email": email,
                "tier": tier,
                "note": f"Order for {customer['name']}",
                "lines": [{"sku": "A-1", "qty": 2}],
            },
        )
        summaries.append({"order": order["id"], "label": f"{customer['name']} / {order['id']}"})

    async def for_each() -> None:
        listing = await get_json(f"{base}/items", params={"n": str(args.items)})
        ids = [entry["id"] for entry in listing["data"]]
        results: list[Any] = [None] * len(ids)
        turns = iter(enumerate(ids))

        async def worker() -> None:  # as flowrunner's for_each: workers take items in turn
            for index, item in turns:
                results[index] = await post_json(
                    f"{base}/cards", {"title": f"Card {item}", "position": index, "item": item}
                )

        async with asyncio.TaskGroup() as group:
            for _ in range(min(args.concurrency, len(ids))):
                group.create_task(worker())
        assert all(r is not None for r in results)

    rss_before = _max_rss_kb()
    cpu = time.process_time()
    start = time.perf_counter()
    if args.workload == "a":
        await _drive(args.runs, args.in_flight, three_steps)
        assert len(summaries) == args.runs
    else:
        await for_each()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    await session.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "rss_before_kb": rss_before}


async def _flowrunner(args: argparse.Namespace, history: bool, profiler: Any) -> dict[str, Any]:
    from flowrunner.app import build_runtime, tune_garbage_collector
    from flowrunner.loader import load_project

    root: Path = args.measure
    shutil.rmtree(root / ".flowrunner", ignore_errors=True)  # a fresh state database
    setup = time.perf_counter()
    project = load_project(root)
    problems = [str(p) for p in project.problems]
    if problems or {FLOW_A, FLOW_B} - set(project.flows):
        raise RuntimeError(f"the benchmark project does not load: {problems[:5]}")
    runtime = build_runtime(root, project=project, keep_history=history)
    tune_garbage_collector()  # as `flowrunner serve` does before it serves
    setup = time.perf_counter() - setup
    engine = runtime.engine

    async def three_steps(index: int) -> None:
        record = await engine.run(FLOW_A, inputs={"customer": index + 1})
        if record.status != "succeeded":
            raise RuntimeError(f"run {index} of {FLOW_A}: {record.status}: {record.error}")

    rss_before = _max_rss_kb()
    if profiler is not None:
        profiler.start()
    cpu = time.process_time()
    start = time.perf_counter()
    if args.workload == "a":
        await _drive(args.runs, args.in_flight, three_steps)
    else:
        record = await engine.run(FLOW_B, inputs={"n": args.items})
        if record.status != "succeeded":
            raise RuntimeError(f"{FLOW_B}: {record.status}: {record.error}")
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if profiler is not None:
        profiler.stop()
    await runtime.aclose()
    result: dict[str, Any] = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rss_before_kb": rss_before,
        "setup_seconds": setup,
    }
    if history:
        result["history"] = _history_rows(runtime.database.engine)
        runtime.database.close()
    return result


def _history_rows(engine: Any) -> dict[str, int]:
    """How many runs and steps the history holds (checked by the parent)."""
    from sqlalchemy import func, select

    from flowrunner.store.schema import runs

    with engine.connect() as conn:
        return {
            "runs": int(conn.execute(select(func.count()).select_from(runs)).scalar_one()),
            "steps": int(
                conn.exec_driver_sql(
                    "SELECT coalesce(sum(json_array_length(steps)), 0) FROM runs"
                ).scalar_one()
            ),
        }


class _Profiler:
    """pyinstrument (sampling) when installed, else cProfile; start/stop/report."""

    def __init__(self) -> None:
        try:
            from pyinstrument import Profiler
        except ImportError:
            import cProfile

            self.kind = "cProfile"
            self._impl: Any = cProfile.Profile()
        else:
            self.kind = "pyinstrument"
            # async_mode disabled: sample the thread's whole stack, event loop included.
            self._impl = Profiler(interval=0.001, async_mode="disabled")

    def start(self) -> None:
        if self.kind == "cProfile":
            self._impl.enable()
        else:
            self._impl.start()

    def stop(self) -> None:
        if self.kind == "cProfile":
            self._impl.disable()
        else:
            self._impl.stop()

    def report(self, top: int) -> str:
        if self.kind == "cProfile":
            return (
                profile_report(self._impl, top=top, top_own=top)
                + "\n\n"
                + _cprofile_packages(self._impl)
            )
        return _pyinstrument_report(self._impl.last_session, top)


def _where(filename: str, line: int, function: str) -> str:
    """A short location: site-packages first (the venv may live inside the repository)."""
    if filename in ("~", "<built-in>", ""):
        return f"<C> {function}"
    path = Path(filename)
    for base, prefix in ((_SITE_PACKAGES, ""), (_STDLIB, "stdlib/"), (REPO, "")):
        try:
            return f"{prefix}{path.resolve().relative_to(base)}:{line}({function})"
        except ValueError:
            continue
    return f"{path.name}:{line}({function})"


def _package_of(filename: str) -> str:
    """flowrunner modules one by one; third-party and stdlib code by top-level package."""
    if filename in ("~", "<built-in>", ""):
        return "<C builtins>"
    location = _where(filename, 0, "").rsplit(":", 1)[0]
    if location.startswith(("flowrunner/", "bench/")):
        return location
    if location.startswith("stdlib/"):
        return "stdlib " + location.removeprefix("stdlib/").split("/")[0].removesuffix(".py")
    return location.split("/")[0].removesuffix(".py")


def _by_package(own: dict[str, float], total: float, title: str) -> str:
    ranked = sorted(own.items(), key=lambda kv: kv[1], reverse=True)[:20]
    return f"{title}:\n" + table(
        ("where", "own s", "%"),
        [(name, f"{s:.3f}", f"{100 * s / total:.1f}%" if total else "-") for name, s in ranked],
    )


def _cprofile_packages(profile: Any) -> str:
    import pstats

    entries: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    sums: dict[str, float] = {}
    for (filename, _line, _function), (_cc, _nc, tt, _ct, _callers) in entries.items():
        name = _package_of(filename)
        sums[name] = sums.get(name, 0.0) + tt
    return _by_package(sums, sum(sums.values()), "own time by module / package")


def _pyinstrument_report(session: Any, top: int) -> str:
    """Flat tables from pyinstrument's samples: own and cumulative time per function.

    Cumulative time counts a function once per stack (recursion is not double counted).
    The per-package table charges C functions (sqlite3, json, regex, socket) to the
    package of the Python code that called them.
    """
    root = session.root_frame()
    if root is None:
        return "pyinstrument recorded no samples"
    total = root.time
    Key = tuple[str, int, str]
    own: dict[Key, float] = {}
    cumulative: dict[Key, float] = {}
    packages: dict[str, float] = {}
    stack: list[tuple[Any, frozenset[Key], str]] = [(root, frozenset(), "?")]
    while stack:  # bounded: every frame of the recorded tree is visited once
        frame, above, caller_package = stack.pop()
        if frame.is_synthetic:
            continue
        key = (frame.file_path or "<built-in>", frame.line_no or 0, frame.function)
        self_time = frame.total_self_time
        own[key] = own.get(key, 0.0) + self_time
        if key not in above:
            cumulative[key] = cumulative.get(key, 0.0) + frame.time
        package = _package_of(key[0])
        if package == "<C builtins>":
            package = caller_package
        packages[package] = packages.get(package, 0.0) + self_time
        below = above | {key}
        stack.extend((child, below, package) for child in frame.children)

    def render(ranking: dict[Key, float]) -> str:
        ranked = sorted(ranking.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return table(
            ("function", "own s", "own %", "cum s", "cum %"),
            [
                (
                    _where(*key),
                    f"{own.get(key, 0.0):.3f}",
                    f"{100 * own.get(key, 0.0) / total:.1f}%",
                    f"{cumulative.get(key, 0.0):.3f}",
                    f"{100 * cumulative.get(key, 0.0) / total:.1f}%",
                )
                for key, _value in ranked
            ],
        )

    return (
        f"pyinstrument: {session.sample_count} samples over {total:.3f} s of wall time\n\n"
        f"top {top} by cumulative time:\n{render(cumulative)}\n\n"
        f"top {top} by own time:\n{render(own)}\n\n"
        + _by_package(
            packages, total, "own time by module / package (C calls charged to their caller)"
        )
    )


def measure(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one variant, one workload; prints the result as JSON."""
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})  # what `taskset -c N` does, from inside
    started = time.perf_counter()
    profiler = _Profiler() if args.profile else None
    if args.variant == "baseline":
        import aiohttp  # noqa: F401 - imported here so that its cost is not in the timing

        import_seconds = time.perf_counter() - started
        result = asyncio.run(_baseline(args))
    else:
        import flowrunner.app  # noqa: F401 - same: the import is reported apart

        import_seconds = time.perf_counter() - started
        history = args.variant == "flowrunner"
        result = asyncio.run(_flowrunner(args, history, profiler))
    if profiler is not None:
        print(profiler.report(args.top))
    result.update(
        variant=args.variant,
        workload=args.workload,
        import_seconds=import_seconds,
        peak_rss_kb=_max_rss_kb(),
        profiler=profiler.kind if profiler else None,
    )
    emit(result)


# ---------------------------------------------------------------- the upstream server


class Upstream:
    """bench/upstream.py in its own process, pinned to its own CPU when there are two."""

    def __init__(self, token: str, pin: bool) -> None:
        self.port = _free_port()
        command = [sys.executable, str(UPSTREAM), "--port", str(self.port), "--token", token]
        self.pinned = False
        if pin:
            taskset = shutil.which("taskset")
            if taskset:
                command = [taskset, "-c", str(UPSTREAM_CPU), *command]
            else:
                command += ["--cpu", str(UPSTREAM_CPU)]
            self.pinned = True
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and script, no shell
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self._wait_ready()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, attempts: int = 200, pause: float = 0.05) -> None:
        for _ in range(attempts):  # at most attempts * pause seconds (10 s)
            if self.process.poll() is not None:
                _out, err = self.process.communicate()
                raise MeasurementFailed(f"the upstream server exited: {err[-2000:]}")
            try:
                self.get("/health")
                return
            except OSError:
                time.sleep(pause)
        self.stop()
        raise MeasurementFailed("the upstream server did not answer within 10 s")

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return json.loads(response.read())
        finally:
            conn.close()

    def stats(self) -> dict[str, dict[str, int]]:
        stats: dict[str, dict[str, int]] = self.get("/stats")
        return stats

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _diff(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {
        section: {
            key: value - before.get(section, {}).get(key, 0)
            for key, value in after.get(section, {}).items()
            if value - before.get(section, {}).get(key, 0)
        }
        for section in ("calls", "authorized", "body_bytes")
    }


# ---------------------------------------------------------------- the parent process


def _expected_calls(workload: str, args: argparse.Namespace) -> dict[str, int]:
    if workload == "a":
        return {"GET /customers": args.runs, "POST /orders": args.runs}
    return {"GET /items": 1, "POST /cards": args.items}


def _expected_history(workload: str, args: argparse.Namespace) -> dict[str, int]:
    if workload == "a":
        return {"runs": args.runs, "steps": 3 * args.runs}
    return {"runs": 1, "steps": 2 + args.items}  # items, cards, and one card per item


def _child_args(
    root: Path, upstream: Upstream, variant: str, workload: str, args: argparse.Namespace
) -> list[str]:
    child = [
        "--measure", str(root), "--variant", variant, "--workload", workload,
        "--base-url", upstream.base_url, "--runs", str(args.runs),
        "--in-flight", str(args.in_flight), "--items", str(args.items),
        "--concurrency", str(args.concurrency), "--top", str(args.top),
    ]  # fmt: skip
    if upstream.pinned:
        child += ["--cpu", str(MEASURE_CPU)]
    return child


def _measure_once(
    root: Path, upstream: Upstream, variant: str, workload: str, args: argparse.Namespace
) -> dict[str, Any]:
    before, cpu_before = upstream.stats(), upstream.cpu_seconds()
    result, _text = run_child(SCRIPT, _child_args(root, upstream, variant, workload, args))
    result["upstream_cpu_seconds"] = upstream.cpu_seconds() - cpu_before
    seen = _diff(upstream.stats(), before)
    expected = _expected_calls(workload, args)
    if seen["calls"] != expected or seen["authorized"] != expected:
        raise MeasurementFailed(
            f"{variant} on workload {workload} made other calls than expected: "
            f"{seen} (expected {expected}, every one with the bearer token)"
        )
    result["body_bytes"] = seen["body_bytes"]
    if "history" in result and result["history"] != _expected_history(workload, args):
        raise MeasurementFailed(
            f"{variant} on workload {workload}: the run history holds {result['history']}, "
            f"expected {_expected_history(workload, args)}"
        )
    return result


def run(args: argparse.Namespace) -> int:
    token = os.environ.get("BENCH_TOKEN") or "bench-" + secrets.token_urlsafe(24)
    os.environ["BENCH_TOKEN"] = token  # the measuring processes inherit it
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    print(
        f"engine benchmark: (a) {args.runs} runs of a 3-step flow, {args.in_flight} in flight; "
        f"(b) one for_each over {args.items} items at concurrency {args.concurrency}"
    )
    print(
        f"python {sys.version.split()[0]} on {sys.platform}, {os.cpu_count()} CPUs (shared "
        f"machine: figures are noisy, medians of {args.repeat} fresh-process runs); "
        + (
            f"measuring process pinned to CPU {MEASURE_CPU}, upstream to CPU {UPSTREAM_CPU}"
            if pin
            else "no CPU pinning"
        )
    )
    print(_tree_note())
    print(_load_note())
    workdir = Path(tempfile.mkdtemp(prefix="flowrunner-bench-engine-"))
    upstream: Upstream | None = None
    try:
        upstream = Upstream(token, pin)
        root = workdir / "project"
        write_project(root, upstream.base_url, args.concurrency)
        print(f"project in {root}, upstream at {upstream.base_url}")
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        if not args.profile_only:
            for workload in WORKLOADS:
                results[workload] = {v: [] for v in VARIANTS}
                for repeat in range(args.repeat):
                    # Alternate the order so that a noisy spell does not favour one variant.
                    order = VARIANTS if repeat % 2 == 0 else tuple(reversed(VARIANTS))
                    for variant in order:
                        result = _measure_once(root, upstream, variant, workload, args)
                        results[workload][variant].append(result)
                    print(
                        f"  {WORKLOAD_TITLES[workload]} repeat {repeat + 1}: "
                        + ", ".join(
                            f"{v} {results[workload][v][-1]['seconds']:.3f} s" for v in VARIANTS
                        )
                    )
            print(_load_note())
            _print_results(results, args)
        if args.profile or args.profile_only:
            for workload in args.profile_workload:
                _print_profile(root, upstream, workload, args)
    except MeasurementFailed as exc:
        print(f"measurement failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _tree_note() -> str:
    """Which flowrunner was measured: the commit, and whether flowrunner/ has local edits."""
    git = shutil.which("git")
    if git is None:
        return "flowrunner: (git not found)"
    try:
        head = subprocess.run(  # noqa: S603 - git by absolute path, fixed read-only arguments
            [git, "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(  # noqa: S603 - same; --no-optional-locks: writes nothing
            [git, "--no-optional-locks", "-C", str(REPO), "status", "--porcelain", "flowrunner"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "flowrunner: (not a git checkout)"
    edits = f", working tree with {len(changed)} changed files under flowrunner/" if changed else ""
    return f"flowrunner at commit {head}{edits}"


def _load_note() -> str:
    one, five, _fifteen = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return median([float(r[key]) for r in runs])


def _print_results(
    results: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace
) -> None:
    main_rows = []
    detail_rows = []
    for workload, by_variant in results.items():
        base = _med(by_variant["baseline"], "seconds")
        fr = _med(by_variant["flowrunner"], "seconds")
        nohist = _med(by_variant["flowrunner-nohistory"], "seconds")
        rss = {v: _med(by_variant[v], "peak_rss_kb") / 1024 for v in VARIANTS}
        main_rows.append(
            (
                WORKLOAD_TITLES[workload],
                f"{base:.3f}",
                f"{fr:.3f}",
                f"{fr / base:.2f}x",
                f"<= {GOAL_RATIO}x: " + ("yes" if fr / base <= GOAL_RATIO else "NO"),
                f"{nohist:.3f}",
                f"{nohist / base:.2f}x",
                f"{rss['baseline']:.0f}",
                f"{rss['flowrunner']:.0f}",
                f"{rss['flowrunner-nohistory']:.0f}",
            )
        )
        calls = sum(_expected_calls(workload, args).values())
        base_cpu = _med(by_variant["baseline"], "cpu_seconds")
        for variant in VARIANTS:
            runs = by_variant[variant]
            seconds = _med(runs, "seconds")
            growth = median([(r["peak_rss_kb"] - r["rss_before_kb"]) / 1024 for r in runs])
            expected = _expected_calls(workload, args)
            per_body = {k: v // expected[k] for k, v in runs[-1]["body_bytes"].items()}
            detail_rows.append(
                (
                    f"{WORKLOAD_TITLES[workload]} {variant}",
                    "[" + ", ".join(f"{r['seconds']:.3f}" for r in runs) + "]",
                    f"{_med(runs, 'cpu_seconds'):.3f}",
                    f"{_med(runs, 'cpu_seconds') / base_cpu:.2f}x",
                    f"{_med(runs, 'upstream_cpu_seconds'):.2f}",
                    f"{1e6 * seconds / calls:.0f}",
                    f"{1e6 * _med(runs, 'cpu_seconds') / calls:.0f}",
                    f"{growth:.1f}",
                    f"{_med(runs, 'import_seconds'):.2f}",
                    ", ".join(f"{v}" for v in per_body.values()) or "-",
                )
            )
    print()
    print(
        table(
            (
                "workload",
                "baseline s",
                "flowrunner s",
                "ratio",
                "goal met",
                "no-history s",
                "ratio",
                "RSS base MB",
                "RSS fr MB",
                "RSS no-hist MB",
            ),
            main_rows,
        )
    )
    print(
        "flowrunner = run history on (SQLite in the project's .flowrunner/); no-history = "
        "keep_history=False; ratio = variant / baseline wall time (medians); RSS = peak RSS "
        "of the measuring process (ru_maxrss)"
    )
    print()
    print(
        table(
            (
                "variant",
                "wall s (each run)",
                "CPU s",
                "CPU ratio",
                "upstream CPU s",
                "wall us/call",
                "CPU us/call",
                "RSS growth MB",
                "import s",
                "body bytes/call",
            ),
            detail_rows,
        )
    )
    print(
        "CPU s = process time of the measuring process over the workload (steadier than wall "
        "time on a shared machine); CPU ratio = against the baseline's; upstream CPU s = the "
        "server's, over the same measurement; us/call = per HTTP call; RSS growth = peak RSS "
        "minus peak RSS before the workload; every variant made the same calls (checked with "
        "the server's counters, bearer token included)"
    )


def _print_profile(root: Path, upstream: Upstream, workload: str, args: argparse.Namespace) -> None:
    child = _child_args(root, upstream, "flowrunner", workload, args) + ["--profile"]
    result, text = run_child(SCRIPT, child)
    print(
        f"\nprofile of flowrunner (history on), workload {WORKLOAD_TITLES[workload]}, one "
        f"separate run under {result['profiler']}: {result['seconds']:.3f} s wall, "
        f"{result['cpu_seconds']:.3f} s CPU (profiler overhead included)"
    )
    print(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="(a): runs of the 3-step flow")
    parser.add_argument("--in-flight", type=int, default=32, help="(a): runs at a time")
    parser.add_argument("--items", type=int, default=1000, help="(b): for_each items")
    parser.add_argument("--concurrency", type=int, default=10, help="(b): for_each concurrency")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--profile", action="store_true", help="also profile flowrunner")
    parser.add_argument(
        "--profile-only", action="store_true", help="profile without the timed comparison"
    )
    parser.add_argument(
        "--profile-workload", nargs="+", choices=WORKLOADS, default=["a"], metavar="W"
    )
    parser.add_argument("--top", type=int, default=25, help="profile entries shown")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    # Internal: one measurement in this (fresh) process.
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        measure(args)
        return 0
    if min(args.runs, args.in_flight, args.items, args.concurrency, args.repeat) < 1:
        parser.error("--runs, --in-flight, --items, --concurrency and --repeat must be positive")
    if args.concurrency > 100:
        parser.error("--concurrency: a for_each allows at most 100")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
