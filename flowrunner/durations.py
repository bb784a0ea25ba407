"""Durations as analysts write them: ``30s``, ``15m``, ``2h``, ``14d``, ``1h30m``."""

from __future__ import annotations

import re
from datetime import timedelta

_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# ASCII digits only: `\d` would also accept other scripts' digits, which float() reads.
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)")
_WHOLE = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d|w))+$")

DURATION_HINT = "write a number and a unit: 500ms, 30s, 15m, 2h, 14d, 1w (or combined: 1h30m)"


def parse_duration(text: str | int | float) -> timedelta:
    """Parse a duration; a bare number counts as seconds. Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"a duration cannot be negative ({text})")
        try:
            return timedelta(seconds=text)
        except (OverflowError, ValueError):
            raise ValueError(f"{text!r} is too long for a duration") from None
    compact = text.strip().replace(" ", "").lower()
    if not compact or not _WHOLE.match(compact):
        raise ValueError(f"{text!r} is not a duration")
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(compact))
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{text!r} is too long for a duration") from None


def format_duration(delta: timedelta) -> str:
    """The shortest exact form, for messages: 90s -> '1m30s'."""
    total = int(delta.total_seconds())
    if total == 0:
        return f"{int(delta.total_seconds() * 1000)}ms"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
