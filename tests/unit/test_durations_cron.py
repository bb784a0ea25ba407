"""Durations (``15m``, ``14d``) and five-field cron expressions, as analysts write them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from flowrunner.durations import format_duration, parse_duration
from flowrunner.model.cron import check_cron

# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("14d", timedelta(days=14)),
        ("1w", timedelta(weeks=1)),
        ("365d", timedelta(days=365)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        (" 1h 30m ", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("2H", timedelta(hours=2)),
        ("0s", timedelta(0)),
        (90, timedelta(seconds=90)),
        (2.5, timedelta(seconds=2.5)),
        (0, timedelta(0)),
    ],
)
def test_parse_duration_accepts_the_written_forms(
    text: str | int | float, expected: timedelta
) -> None:
    """Numbers with units, combined units, spaces, any case and bare numbers (seconds) parse."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "m", "15", "15 minutes", "-5s", "1y", "h1", "1h-30m", "1e3s", ".5s", "nan", "5 s x"],
)
def test_parse_duration_rejects_other_text(text: str) -> None:
    """Text that is not numbers with units raises ValueError naming the text."""
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("value", "message"), [(True, "not a duration"), (-3, "negative")])
def test_parse_duration_rejects_booleans_and_negative_numbers(
    value: bool | int, message: str
) -> None:
    """A boolean is not a duration and a negative number of seconds is refused."""
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize("value", [float("inf"), "99999999999999d"])
def test_parse_duration_raises_only_value_error(value: float | str) -> None:
    """A duration too long for timedelta is a ValueError, as the docstring promises."""
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(seconds=90), "1m30s"),
        (timedelta(minutes=15), "15m"),
        (timedelta(hours=2), "2h"),
        (timedelta(days=14), "14d"),
        (timedelta(days=1, hours=2, minutes=3, seconds=4), "1d2h3m4s"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(0), "0ms"),
    ],
)
def test_format_duration_writes_the_shortest_form(delta: timedelta, expected: str) -> None:
    """Durations print in the units analysts write, largest first."""
    assert format_duration(delta) == expected


@pytest.mark.parametrize("text", ["30s", "15m", "2h", "14d", "1h30m", "1d2h3m4s", "500ms"])
def test_format_then_parse_round_trips(text: str) -> None:
    """What format_duration writes parses back to the same duration."""
    delta = parse_duration(text)
    assert parse_duration(format_duration(delta)) == delta


# ---------------------------------------------------------------- cron


@pytest.mark.parametrize(
    "expression",
    [
        "0 7 * * MON-FRI",
        "*/15 * * * *",
        "0 0 1 jan,jul *",
        "0 6 1 * *",
        "0-59/5 0-23 1-31 1-12 0-6",
        "5,10,15 * * * *",
        "0 12 * * 1-5/2",
        "30 8 * * sun",
        "0 0 * * 7",
        "  0 7  * * mon  ",
    ],
)
def test_check_cron_accepts_valid_expressions(expression: str) -> None:
    """Numbers, ranges, steps, lists, '*' and English names are valid."""
    assert check_cron(expression) is None


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("0 7 * *", "5 fields, this one has 4"),
        ("0 7 * * * *", "5 fields, this one has 6"),
        ("@daily", "5 fields, this one has 1"),
        ("", "this one has 0"),
        ("60 * * * *", "minute 60 is out of range 0-59"),
        ("0 24 * * *", "hour 24 is out of range 0-23"),
        ("0 0 0 * *", "day of month 0 is out of range 1-31"),
        ("0 0 32 * *", "day of month 32 is out of range 1-31"),
        ("0 0 * 13 *", "month 13 is out of range 1-12"),
        ("0 0 * * 8", "day of week 8 is out of range 0-7"),
        ("0 7 * * MON-FRY", "'FRY' is not a valid day of week"),
        ("0 0 * janu *", "'janu' is not a valid month"),
        ("0 0 * * fri-mon", "the range runs backwards"),
        ("5-1 * * * *", "the range runs backwards"),
        ("*-5 * * * *", "a range cannot start with '*'"),
        ("*/0 * * * *", "a step of 0 never fires"),
        ("1,,2 * * * *", "is not a valid minute field"),
        ("0 0 ? * *", "'?' is not a valid day of month field"),
        ("0 0 * * MON#2", "is not a valid day of week field"),
        ("L * * * *", "'L' is not a valid minute"),
    ],
)
def test_check_cron_says_what_is_wrong(expression: str, reason: str) -> None:
    """An invalid expression comes back with the reason, naming the field at fault."""
    problem = check_cron(expression)
    assert problem is not None
    assert reason in problem
