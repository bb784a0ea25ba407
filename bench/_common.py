"""Helpers shared by the benchmarks in bench/: fresh-process measurements, tables, profiles.

Every benchmark follows the same pattern: the parent process prepares the inputs, then
runs each measurement in a fresh Python process (the same script with a hidden flag) so
that in-process caches never carry over from one measurement to the next, and prints
the result next to a baseline measured in the same run on the same inputs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"]).resolve()
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


class MeasurementFailed(RuntimeError):
    """A measuring subprocess exited with an error or printed no result."""


def run_child(
    script: Path, args: Sequence[str], timeout: float = 600
) -> tuple[dict[str, Any], str]:
    """Run ``python script *args`` in a fresh process.

    The child prints free text (a profile, say) and then its result as one JSON object on
    the last line of stdout. Returns the parsed result and the text before it.
    """
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    completed = subprocess.run(  # noqa: S603 - our own interpreter and script, no shell
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    lines = completed.stdout.rstrip("\n").splitlines()
    if completed.returncode != 0 or not lines:
        raise MeasurementFailed(
            f"{script.name} {' '.join(args)} exited with {completed.returncode}\n"
            f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
        )
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise MeasurementFailed(f"no JSON result on the last line: {lines[-1]!r}") from exc
    if not isinstance(result, dict):
        raise MeasurementFailed(f"the result is not a JSON object: {lines[-1]!r}")
    return result, "\n".join(lines[:-1])


def emit(result: dict[str, Any]) -> None:
    """The child's side of ``run_child``: the result, alone on the last line of stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file once so that no measurement pays for a cold disk."""
    for path in paths:
        path.read_bytes()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, first column left-aligned and the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


# ---------------------------------------------------------------- profiles


def _short_location(filename: str, line: int, function: str) -> str:
    if filename == "~":  # a C builtin
        return function
    path = Path(filename)
    for base, prefix in ((REPO, ""), (_SITE_PACKAGES, ""), (_STDLIB, "stdlib/")):
        try:
            return f"{prefix}{path.resolve().relative_to(base)}:{line}({function})"
        except ValueError:
            continue
    return f"{path.name}:{line}({function})"


def profile_report(stats_source: Any, top: int = 15, top_own: int = 10) -> str:
    """The ``top`` entries by cumulative time and the ``top_own`` by own time.

    ``stats_source`` is a ``cProfile.Profile``; paths are shortened to the package
    (``flowrunner/loader.py``, ``pydantic/main.py``) so that the table stays readable.
    """
    import pstats

    stats = pstats.Stats(stats_source)
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total: float = stats.total_tt  # type: ignore[attr-defined]
    rows = [
        (ct, tt, nc, cc, _short_location(*func))
        for func, (cc, nc, tt, ct, _callers) in entries.items()
    ]
    headers = ("function", "calls", "own s", "cum s", "cum %")

    def render(selected: list[tuple[float, float, int, int, str]]) -> str:
        return table(
            headers,
            [
                (
                    where,
                    str(nc) if nc == cc else f"{nc}/{cc}",
                    f"{tt:.3f}",
                    f"{ct:.3f}",
                    f"{100 * ct / total:.0f}%" if total else "-",
                )
                for ct, tt, nc, cc, where in selected
            ],
        )

    by_cumulative = sorted(rows, key=lambda r: r[0], reverse=True)[:top]
    by_own = sorted(rows, key=lambda r: r[1], reverse=True)[:top_own]
    return (
        f"total profiled time {total:.3f} s (cProfile overhead included)\n\n"
        f"top {top} by cumulative time:\n{render(by_cumulative)}\n\n"
        f"top {top_own} by own time:\n{render(by_own)}"
    )
