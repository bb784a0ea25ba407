"""Pruning benchmark: ``RunHistory.prune`` against one plain DELETE, on the same history.

    python bench/prune.py [--runs 20000] [--body 3000] [--repeat 3]

Each measurement builds a fresh SQLite state database (in a temporary directory) holding
``--runs`` finished runs older than the cutoff, each with two http steps whose request and
response bodies are ``--body`` characters (about 15 KB a run by default), and 1,000 recent
runs that must stay. Then, with the log checkpointed by a thread as ``flowrunner serve``
does (and no checkpoint by a committing connection: it runs once the commit has let the
write lock go, and would be timed as if it held it):

- flowrunner: ``RunHistory.prune(cutoff)``, which deletes in transactions of about 20 ms
  with a pause as long between two, so that the server's writes are held that long at
  most;
- baseline: one ``DELETE FROM runs WHERE started_at < ?`` in one transaction, the fastest
  way to remove the same rows, which holds the database's write lock throughout.

Each measurement runs in a fresh process; the two alternate. Printed: the total seconds
of each and their ratio, and the longest time the write lock was held (flowrunner: its
longest transaction; baseline: its one transaction), the figure that matters to a server
that keeps taking webhooks while it prunes. Both must leave exactly the recent runs.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MeasurementFailed, emit, median, run_child, table

from flowrunner.store import database as store_database
from flowrunner.store.database import Database
from flowrunner.store.runs import RunHistory, RunRecord, StepRecord, finished_rows
from flowrunner.store.schema import runs

RECENT = 1_000
SCRIPT = Path(__file__).resolve()


def fill(database: Database, old: int, body: int, now: datetime) -> None:
    request = {"method": "GET", "url": "https://api.example/x", "headers": {}, "body": "x" * body}
    response = {"status": 200, "headers": {}, "body": "y" * body}
    step = StepRecord(0, "get", "http", "succeeded", now, 1.0, 1, request, response, {"n": 1})
    rows = []
    for index in range(old + RECENT):
        age = timedelta(days=60, seconds=index) if index < old else timedelta(seconds=index)
        started = now - age
        record = RunRecord(
            f"run-{index:07d}", "flow", "succeeded", {}, {}, started, started, steps=[step, step]
        )
        rows.extend(finished_rows(record, False))
        if len(rows) >= 500:
            database.writes.write_now(rows)
            rows = []
    if rows:
        database.writes.write_now(rows)


@contextmanager
def timing_transactions(database: Database, spans: list[float]) -> Iterator[None]:
    """Record how long each ``engine.begin()`` transaction lasts."""
    begin = database.engine.begin

    @contextmanager
    def timed():  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        with begin() as conn:
            yield conn
        spans.append(time.perf_counter() - started)

    database.engine.begin = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        database.engine.begin = begin  # type: ignore[method-assign]


def measure(variant: str, old: int, body: int) -> dict[str, float]:
    # No checkpoint by a committing connection either: it runs after the commit has let
    # the write lock go, and would be timed as if it held it.
    store_database.AUTOCHECKPOINT_PAGES = 0
    now = datetime.now(UTC)
    cutoff = now - timedelta(days=30)
    with tempfile.TemporaryDirectory(prefix="flowrunner-bench-prune-") as workdir:
        database = Database.open(f"sqlite:///{Path(workdir) / 'state.db'}")
        try:
            fill(database, old, body, now)
            # As the server does: the log is copied into the database by a thread of its
            # own, so that no transaction timed here includes a checkpoint.
            database.checkpoint_in_background()
            spans: list[float] = []
            started = time.perf_counter()
            with timing_transactions(database, spans):
                if variant == "flowrunner":
                    RunHistory(database).prune(cutoff)
                else:
                    with database.engine.begin() as conn:
                        conn.execute(runs.delete().where(runs.c.started_at < cutoff))
            seconds = time.perf_counter() - started
            with database.engine.connect() as conn:
                left = conn.execute(runs.select()).fetchall()
        finally:
            database.close()
    if len(left) != RECENT:
        raise MeasurementFailed(f"{variant} left {len(left)} runs, not the {RECENT} recent ones")
    return {
        "seconds": seconds,
        "longest": max(spans),
        "typical": median(spans),
        "transactions": len(spans),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20_000, help="old runs to remove")
    parser.add_argument("--body", type=int, default=3_000, help="characters per step body")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--measure", choices=("baseline", "flowrunner"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child: one measurement in a fresh process
        emit(measure(args.measure, args.runs, args.body))
        return 0
    print(f"pruning {args.runs:,} old runs ({args.body:,}-character bodies), {RECENT:,} kept")
    results: dict[str, list[dict[str, float]]] = {"baseline": [], "flowrunner": []}
    for repeat in range(args.repeat):
        order = ("baseline", "flowrunner") if repeat % 2 == 0 else ("flowrunner", "baseline")
        for variant in order:
            result, _ = run_child(
                SCRIPT, ["--measure", variant, "--runs", str(args.runs), "--body", str(args.body)]
            )
            results[variant].append(result)
            print(
                f"  repeat {repeat + 1} {variant}: {result['seconds']:.2f} s, longest "
                f"transaction {result['longest'] * 1000:.0f} ms, median "
                f"{result['typical'] * 1000:.0f} ms, {result['transactions']:.0f} transaction(s)"
            )
    keys = ("seconds", "longest", "typical")
    base = {key: median([r[key] for r in results["baseline"]]) for key in keys}
    ours = {key: median([r[key] for r in results["flowrunner"]]) for key in keys}
    print()
    print(
        table(
            ["variant", "total s", "ratio", "longest transaction ms", "median transaction ms"],
            [
                [
                    "baseline (one DELETE)",
                    f"{base['seconds']:.2f}",
                    "1.00x",
                    f"{base['longest'] * 1000:.0f}",
                    f"{base['typical'] * 1000:.0f}",
                ],
                [
                    "flowrunner (prune)",
                    f"{ours['seconds']:.2f}",
                    f"{ours['seconds'] / base['seconds']:.2f}x",
                    f"{ours['longest'] * 1000:.0f}",
                    f"{ours['typical'] * 1000:.0f}",
                ],
            ],
        )
    )
    print(
        "total = wall time of the removal; longest transaction = the most the server's "
        "writes would wait for the lock; medians of the repeats"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
