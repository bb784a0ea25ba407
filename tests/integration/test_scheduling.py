"""Schedules: fire keys that make each fire run once, `every:` schedules on a real clock,
cron times across DST changes, and catch-up after a stop.

Servers run in-process (``serving.ServerPool``); catch-up is driven with an injected
clock, on cron rules that the real clock cannot reach during the test (29 February).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from serving import Served, ServeFactory, ServerPool

from flowrunner.model import Schedule
from flowrunner.scheduling import fire_times, latest_fire, next_fire_times, trigger_for

PARIS = ZoneInfo("Europe/Paris")


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    """Start servers on project directories; all are stopped at teardown."""
    async with ServerPool() as pool:

        async def start(root: Path, **kwargs: Any) -> Served:
            served = await pool.start(root, **kwargs)
            assert served.server.problems == [], [p.format() for p in served.server.problems]
            return served

        yield start


def scheduled(schedule: str, name: str = "tick") -> dict[str, str]:
    return {
        name: f"""
            name: {name}
            triggers:
              - schedule: {schedule}
            steps:
              - id: note
                set: {{at: "${{{{ trigger.fired_at }}}}"}}
        """
    }


# ---------------------------------------------------------------- fire keys


async def test_a_fire_runs_once_even_fired_twice_or_after_a_restart(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """The same scheduled time fired twice, or fired again by a new server on the same state,
    makes one run; the next scheduled time makes another."""
    root = make_project(scheduled('{cron: "0 7 29 2 *", catch_up: none}'))
    at = datetime(2028, 2, 29, 7, 0, tzinfo=UTC)
    first = await serve(root)
    await first.server.fire("tick", 0, at)
    await first.server.fire("tick", 0, at.astimezone(PARIS))  # the same instant, another zone
    runs = await first.quiet()
    assert len(runs) == 1
    assert runs[0].trigger == {"kind": "schedule", "fired_at": "2028-02-29T07:00:00+00:00"}
    assert runs[0].status == "succeeded"
    await first.stop()
    second = await serve(root)
    await second.server.fire("tick", 0, at)
    await second.quiet()
    assert [r.id for r in second.runs()] == [runs[0].id]
    await second.server.fire("tick", 0, at + timedelta(days=1461))
    assert len(await second.quiet()) == 2


async def test_flows_on_the_same_schedule_share_a_job_and_each_fires_once(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """Flows with the same schedule are fired by one job, each its own run with its own fire
    key; a flow on another schedule has a job of its own."""
    root = make_project(
        {
            **scheduled('{cron: "0 7 * * *", catch_up: none}', name="first"),
            **scheduled('{cron: "0 7 * * *", catch_up: none}', name="second"),
            **scheduled('{cron: "0 8 * * *", catch_up: none}', name="other"),
        }
    )
    now = [datetime(2028, 2, 29, 7, 0, 0, 5000, tzinfo=UTC)]
    served = await serve(root, clock=lambda: now[0])
    scheduler = served.server.scheduler
    job = scheduler.job_of("first")
    assert scheduler.job_of("second") is job
    assert scheduler.job_of("other") is not job
    await job.func(*job.args)
    await job.func(*job.args)  # fired again for the same time: nothing more
    runs = await served.quiet()
    assert sorted((r.flow, r.trigger["fired_at"]) for r in runs) == [
        ("first", "2028-02-29T07:00:00+00:00"),
        ("second", "2028-02-29T07:00:00+00:00"),
    ]


async def test_every_second_fires_on_the_second_with_little_lag(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """`every: 1s` fires on the real clock, once per whole second, and each run starts within
    a second of its scheduled time."""
    served = await serve(make_project(scheduled("{every: 1s, catch_up: none}")))
    await served.until(lambda: len(served.runs()) >= 3, seconds=6)
    await served.stop()
    runs = served.runs()
    fired = [datetime.fromisoformat(r.trigger["fired_at"]) for r in runs]
    assert len(set(fired)) == len(fired)
    assert all(t.microsecond == 0 for t in fired)
    for run, at in zip(runs, fired, strict=True):
        started = run.started_at if run.started_at.tzinfo else run.started_at.replace(tzinfo=UTC)
        assert timedelta(0) <= started - at < timedelta(seconds=1), (at, started)


def test_the_latest_fire_of_a_frequent_schedule_is_found_over_a_long_window() -> None:
    """The latest fire of `every: 1s` within a day is the last whole second, not an old time
    cut off by the list's bound."""
    now = datetime(2026, 5, 4, 12, 30, 15, 250_000, tzinfo=UTC)
    every_second = trigger_for(Schedule(every=timedelta(seconds=1)))
    assert latest_fire(every_second, now, timedelta(days=1)) == now.replace(microsecond=0)
    hourly = trigger_for(Schedule(cron="0 * * * *"))
    assert latest_fire(hourly, now, timedelta(days=1)) == datetime(2026, 5, 4, 12, tzinfo=UTC)
    assert latest_fire(hourly, now, timedelta(minutes=20)) is None


# ---------------------------------------------------------------- DST


def paris_cron(cron: str) -> Any:
    return trigger_for(Schedule(cron=cron, timezone="Europe/Paris"))


def test_a_wall_time_that_does_not_exist_fires_once_that_day() -> None:
    """On 2026-03-29 (Paris springs forward at 02:00, so 02:30 never happens) a 02:30 rule
    fires once, at 03:30 CEST, and the days around it fire at 02:30 as usual."""
    times = fire_times(
        paris_cron("30 2 * * *"),
        datetime(2026, 3, 27, 12, tzinfo=PARIS),
        datetime(2026, 3, 31, 12, tzinfo=PARIS),
    )
    assert [t.astimezone(UTC).isoformat() for t in times] == [
        "2026-03-28T01:30:00+00:00",
        "2026-03-29T01:30:00+00:00",  # 03:30 CEST: the skipped 02:30, as soon as it has passed
        "2026-03-30T00:30:00+00:00",
        "2026-03-31T00:30:00+00:00",
    ]


def test_a_wall_time_that_happens_twice_fires_once() -> None:
    """On 2026-10-25 (Paris falls back at 03:00) 02:30 happens twice; the rule fires at the
    first one only, and listing the fires ends (it used to repeat the second forever)."""
    times = fire_times(
        paris_cron("30 2 * * *"),
        datetime(2026, 10, 24, 12, tzinfo=PARIS),
        datetime(2026, 10, 27, 12, tzinfo=PARIS),
    )
    assert [t.astimezone(UTC).isoformat() for t in times] == [
        "2026-10-25T00:30:00+00:00",  # 02:30 CEST
        "2026-10-26T01:30:00+00:00",
        "2026-10-27T01:30:00+00:00",
    ]
    keys = [t.astimezone(UTC).isoformat() for t in times]
    assert len(set(keys)) == len(keys)
    later = next_fire_times(
        Schedule(cron="30 2 * * *", timezone="Europe/Paris"), datetime(2026, 10, 25, tzinfo=UTC)
    )
    assert [t.day for t in later] == [25, 26, 27]


def test_each_wall_time_of_the_repeated_hour_fires_once() -> None:
    """A half-hourly cron rule fires at each wall-clock time of the night clocks go back once
    (02:00 and 02:30 are not repeated), and keeps its pace before and after."""
    times = fire_times(
        paris_cron("*/30 * * * *"),
        datetime(2026, 10, 25, 1, 0, tzinfo=PARIS),
        datetime(2026, 10, 25, 4, 0, tzinfo=PARIS),
    )
    walls = [t.strftime("%H:%M") for t in times]
    assert walls == ["01:30", "02:00", "02:30", "03:00", "03:30", "04:00"]


async def test_the_scheduler_skips_the_repeated_fire(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """Fired by the scheduler at the second 02:30 of 2026-10-25, the flow does not run again:
    the fire resolves to the first 02:30, whose key has run."""
    root = make_project(
        scheduled('{cron: "30 2 * * *", timezone: Europe/Paris, catch_up: none}', name="night")
    )
    first_pass = datetime(2026, 10, 25, 0, 30, 0, 5000, tzinfo=UTC)
    second_pass = datetime(2026, 10, 25, 1, 30, 0, 5000, tzinfo=UTC)
    now = [first_pass]
    served = await serve(root, clock=lambda: now[0])
    job = served.server.scheduler.job_of("night")
    await job.func(*job.args)  # what APScheduler runs at the first 02:30
    now[0] = second_pass
    await job.func(*job.args)
    runs = await served.quiet()
    assert [r.trigger["fired_at"] for r in runs] == ["2026-10-25T00:30:00+00:00"]


# ---------------------------------------------------------------- catch-up

LEAP_DAY = datetime(2028, 2, 29, 7, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("catch_up", "clock", "fired"),
    [
        ("latest", LEAP_DAY + timedelta(minutes=30), ["2028-02-29T07:00:00+00:00"]),
        ("latest", LEAP_DAY + timedelta(hours=1, minutes=1), []),
        ("none", LEAP_DAY + timedelta(minutes=30), []),
    ],
    ids=["latest-within-grace", "latest-outside-grace", "none"],
)
async def test_catch_up_fires_the_missed_fire_once_within_grace(
    catch_up: str,
    clock: datetime,
    fired: list[str],
    make_project: Callable[..., Path],
    serve: ServeFactory,
) -> None:
    """On start, `catch_up: latest` fires the fire missed within `grace` (1h) once, even
    across another restart; outside the grace, or with `catch_up: none`, nothing fires."""
    schedule = f'{{cron: "0 7 29 2 *", catch_up: {catch_up}, grace: 1h}}'
    root = make_project(scheduled(schedule))
    first = await serve(root, clock=lambda: clock)
    assert [r.trigger["fired_at"] for r in await first.quiet()] == fired
    await first.stop()
    again = await serve(root, clock=lambda: clock + timedelta(minutes=5))
    assert [r.trigger["fired_at"] for r in await again.quiet()] == fired


async def test_catch_up_picks_the_latest_of_several_missed_fires(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """After a stop that missed several fires, catch-up runs only the latest one."""
    root = make_project(scheduled('{cron: "*/10 7 29 2 *", catch_up: latest, grace: 1h}'))
    served = await serve(root, clock=lambda: LEAP_DAY + timedelta(minutes=47))
    runs = await served.quiet()
    assert [r.trigger["fired_at"] for r in runs] == ["2028-02-29T07:40:00+00:00"]
