"""Checks a five-field cron expression at load time.

The scheduler (APScheduler) interprets cron when the flow is scheduled; this check
only makes sure a mistake is reported with its position by ``flowrunner validate``
instead of surfacing when the server starts. It accepts what APScheduler's
``CronTrigger.from_crontab`` accepts: numbers, ranges, steps, lists, ``*`` and
English month and day names (``MON-FRI``, ``jan``).
"""

from __future__ import annotations

import re

_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {
            name: i + 1
            for i, name in enumerate(
                ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
            )
        },
    ),
    (
        "day of week",
        0,
        7,
        {name: i for i, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
    ),
)

_ATOM = re.compile(r"^(?P<start>\*|\w+)(?:-(?P<end>\w+))?(?:/(?P<step>\d+))?$")

CRON_HINT = 'five fields: minute hour day-of-month month day-of-week, e.g. "0 7 * * MON-FRI"'


def check_cron(expression: str) -> str | None:
    """Return what is wrong with ``expression``, or None when it is valid."""
    fields = expression.split()
    if len(fields) != 5:
        return f"a cron expression has 5 fields, this one has {len(fields)}"
    for text, (label, low, high, names) in zip(fields, _FIELDS, strict=True):
        for atom in text.split(","):
            problem = _check_atom(atom, label, low, high, names)
            if problem:
                return problem
    return None


def _check_atom(atom: str, label: str, low: int, high: int, names: dict[str, int]) -> str | None:
    match = _ATOM.match(atom)
    if not match:
        return f"{atom!r} is not a valid {label} field"
    values = []
    for part in (match["start"], match["end"]):
        if part is None or part == "*":
            continue
        value = names.get(part.lower()) if not part.isdigit() else int(part)
        if value is None:
            return f"{part!r} is not a valid {label}"
        if not low <= value <= high:
            return f"{label} {value} is out of range {low}-{high}"
        values.append(value)
    if match["start"] == "*" and match["end"]:
        return f"{atom!r}: a range cannot start with '*'"
    if len(values) == 2 and values[0] > values[1]:
        return f"{atom!r}: the range runs backwards"
    if match["step"] is not None and int(match["step"]) == 0:
        return f"{atom!r}: a step of 0 never fires"
    return None
