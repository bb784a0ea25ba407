"""Schedule benchmark: 1,000 flows on ``every: 1m`` in one ``flowrunner serve`` process.

    python bench/schedules.py [--flows 1000] [--minutes 2] [--cron] [--no-pin] [--keep]

Each flow has one schedule (``every: 1m``, or ``cron: "* * * * *"`` with ``--cron``;
``catch_up: none``) and one ``set`` step, so a run costs what the runner itself costs:
the fire (a dedupe key and a queued run, committed), the dispatcher's claim, the run
history. The server runs alone, pinned to CPU 0 when there are two CPUs; after it is up,
the benchmark waits for ``--minutes`` whole-minute fire rounds, stops it with SIGTERM
(which lets the last runs finish) and reads the run history: for each fire, the lag
between its scheduled time (``trigger.fired_at``) and the run's ``started_at``.

Goal: every run starts within 1 s of its scheduled time; every flow fires once per
minute (no fire missed, none twice). See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MeasurementFailed, table

SERVER_CPU = 0
GOAL_SECONDS = 1.0


def write_project(root: Path, flows: int, cron: bool) -> None:
    (root / "flows").mkdir(parents=True)
    rule = '{cron: "* * * * *", catch_up: none}' if cron else "{every: 1m, catch_up: none}"
    for n in range(1, flows + 1):
        name = f"tick-{n:05d}"
        (root / "flows" / f"{name}.yaml").write_text(
            f"""\
name: {name}
triggers:
  - schedule: {rule}
steps:
  - id: note
    set: {{fired: "${{{{ trigger.fired_at }}}}", flow: "${{{{ run.flow }}}}"}}
""",
            encoding="utf-8",
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def healthy(port: int) -> dict[str, Any] | None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        return json.loads(response.read()) if response.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def _utc(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))
    return ordered[index]


def run(args: argparse.Namespace) -> int:
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    rule = 'cron "* * * * *"' if args.cron else "every: 1m"
    print(
        f"schedule benchmark: {args.flows} flows on {rule}, {args.minutes} fire round(s); "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
        + (f"server pinned to CPU {SERVER_CPU}" if pin else "no pinning")
    )
    print(f"load average before: {os.getloadavg()[0]:.2f} (a shared machine: figures are noisy)")
    workdir = Path(tempfile.mkdtemp(prefix="flowrunner-bench-schedules-"))
    root = workdir / "project"
    write_project(root, args.flows, args.cron)
    port = free_port()
    command = [sys.executable, "-m", "flowrunner", "serve", "--port", str(port)]
    taskset = shutil.which("taskset")
    if pin and taskset:
        command = [taskset, "-c", str(SERVER_CPU), *command]
    log = (workdir / "serve.log").open("ab")
    env = dict(os.environ, FLOWRUNNER_SECRET_KEY="bench-schedules")  # noqa: S106 - a throwaway key
    started = time.monotonic()
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        deadline = started + args.start_timeout
        while (health := healthy(port)) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise MeasurementFailed(
                    "serve did not start: " + (workdir / "serve.log").read_text()[-3000:]
                )
            time.sleep(0.2)
        if health["flows"] != args.flows or health["problems"]:
            raise MeasurementFailed(f"the server loaded {health}, expected {args.flows} flows")
        ready = datetime.now(UTC)
        print(f"serving {health['flows']} flows after {time.monotonic() - started:.1f} s")
        first = (ready + timedelta(minutes=1)).replace(second=0, microsecond=0)
        last = first + timedelta(minutes=args.minutes - 1)
        expected = args.flows * args.minutes
        print(f"measuring the fires from {first:%H:%M:%S} to {last:%H:%M:%S} UTC")
        # Bounded: the last round, then at most --settle seconds for its runs to start.
        end = last + timedelta(seconds=args.settle)
        while datetime.now(UTC) < end:
            if process.poll() is not None:
                raise MeasurementFailed("serve exited during the measurement")
            if datetime.now(UTC) > last and len(_runs(root, first, last)) >= expected:
                break
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log.close()
    try:
        report(_runs(root, first, last), args, first, last)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}; serve exited {process.returncode}")
    return 0


def _runs(root: Path, first: datetime, last: datetime) -> list[tuple[str, datetime, datetime]]:
    """(flow, fired_at, started_at) of the runs of the fires in [first, last]."""
    with sqlite3.connect(root / ".flowrunner" / "state.db", timeout=30) as conn:
        rows = conn.execute("SELECT flow, trigger, started_at FROM runs").fetchall()
    found = []
    for flow, trigger, started_at in rows:
        fired = _utc(json.loads(trigger)["fired_at"])
        if first <= fired <= last:
            found.append((flow, fired, _utc(started_at)))
    return found


def report(
    runs: list[tuple[str, datetime, datetime]],
    args: argparse.Namespace,
    first: datetime,
    last: datetime,
) -> None:
    rounds = [first + timedelta(minutes=m) for m in range(args.minutes)]
    per_fire = collections.Counter((flow, fired) for flow, fired, _ in runs)
    duplicates = sum(count - 1 for count in per_fire.values() if count > 1)
    rows = []
    all_lags: list[float] = []
    for when in rounds:
        lags = [(s - f).total_seconds() for _, f, s in runs if f == when]
        all_lags += lags
        missing = args.flows - len({flow for flow, f, _ in runs if f == when})
        rows.append(_row(f"{when:%H:%M:%S}", lags, missing))
    rows.append(_row("all", all_lags, args.flows * args.minutes - len(set(per_fire))))
    print()
    print(
        table(
            (
                "fire round (UTC)",
                "runs",
                "missing",
                "p50 lag s",
                "p99 lag s",
                "max lag s",
                "spread s",
                "goal met",
            ),
            rows,
        )
    )
    print(
        f"lag = run started_at - trigger.fired_at; spread = last start - first start of the "
        f"round; duplicates (a fire run twice): {duplicates}; "
        f"goal: every run within {GOAL_SECONDS:g} s, none missing, none twice"
    )
    if all_lags:
        buckets = collections.Counter(min(int(lag * 4), 40) for lag in all_lags)
        print("\nruns started, by lag (all rounds):")
        print(
            table(
                ("lag", "runs"),
                [
                    (f"{b / 4:.2f}-{(b + 1) / 4:.2f} s" if b < 40 else ">= 10 s", str(n))
                    for b, n in sorted(buckets.items())
                ],
            )
        )


def _row(label: str, lags: list[float], missing: int) -> tuple[str, ...]:
    if not lags:
        return (label, "0", str(missing), "-", "-", "-", "-", "NO")
    met = max(lags) <= GOAL_SECONDS and missing == 0
    return (
        label,
        str(len(lags)),
        str(missing),
        f"{percentile(lags, 0.5):.3f}",
        f"{percentile(lags, 0.99):.3f}",
        f"{max(lags):.3f}",
        f"{max(lags) - min(lags):.3f}",
        "yes" if met else "NO",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=2, help="fire rounds measured")
    parser.add_argument("--cron", action="store_true", help='cron "* * * * *", not every: 1m')
    parser.add_argument("--settle", type=float, default=30, help="seconds after the last round")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds to load")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server to a CPU")
    parser.add_argument("--keep", action="store_true", help="keep the project and the log")
    args = parser.parse_args(argv)
    if args.flows < 1 or not 1 <= args.minutes <= 10:
        parser.error("--flows must be positive and --minutes between 1 and 10")
    try:
        return run(args)
    except MeasurementFailed as exc:
        print(f"measurement failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
