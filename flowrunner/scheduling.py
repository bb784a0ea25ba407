"""Schedules: the only module that imports APScheduler.

Every fire becomes a queued run whose dedupe key is the fire time, so a fire never runs
twice: not after a restart (the key is in the state store), not on several nodes (they
all try, one insert wins). Interval schedules are anchored to a fixed epoch so that
every node and every restart computes the same fire times.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from flowrunner.model import Flow, Schedule

log = logging.getLogger("flowrunner.scheduling")
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# How long a fire's key is kept: far longer than any restart or catch-up window.
FIRE_KEY_WINDOW = timedelta(days=7)

Fire = Callable[[str, int, datetime], Awaitable[None]]


def trigger_for(schedule: Schedule) -> BaseTrigger:
    zone = ZoneInfo(schedule.timezone)
    if schedule.cron is not None:
        return CronTrigger.from_crontab(crontab_for_apscheduler(schedule.cron), timezone=zone)
    assert schedule.every is not None  # noqa: S101 - the model guarantees one rule
    return IntervalTrigger(seconds=schedule.every.total_seconds(), start_date=EPOCH, timezone=zone)


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DAY_ATOM = re.compile(r"^(?P<start>\*|\w+)(?:-(?P<end>\w+))?(?:/(?P<step>\d+))?$")


def crontab_for_apscheduler(expression: str) -> str:
    """Cron counts weekdays from Sunday (0 or 7); APScheduler 3 counts from Monday (0),
    also in ranges and steps. The day-of-week field is expanded to the days it means,
    by name, which both read the same way."""
    fields = expression.split()
    if len(fields) != 5 or fields[4] == "*":
        return expression
    days: set[int] = set()
    for atom in fields[4].split(","):
        match = _DAY_ATOM.match(atom)
        if match is None:
            return expression  # the validator reports it; keep APScheduler's own error
        step = int(match["step"] or 1)
        first: int | None
        last: int | None
        if match["start"] == "*":
            first, last = 0, 6
        else:
            first = _day_number(match["start"])
            last = _day_number(match["end"]) if match["end"] else (6 if match["step"] else first)
        if first is None or last is None:
            return expression
        if last < first:
            last += 7
        days.update(day % 7 for day in range(first, last + 1, max(step, 1)))
    fields[4] = ",".join(_DAY_NAMES[day] for day in sorted(days))
    return " ".join(fields)


def _day_number(text: str) -> int | None:
    if text.isdigit():
        return int(text) % 7 if int(text) <= 7 else None
    lowered = text.lower()[:3]
    return _DAY_NAMES.index(lowered) if lowered in _DAY_NAMES else None


def _after(trigger: BaseTrigger, previous: datetime | None, moment: datetime) -> datetime | None:
    """The trigger's next fire time after ``moment`` (and ``previous``), skipping the
    second occurrence of a repeated wall-clock time of a cron schedule.

    Arithmetic happens in UTC: adding a microsecond to a local time in the repeated hour
    of a DST change loses its ``fold`` and goes back an hour (APScheduler then answers
    the same time again, forever). A cron rule names wall-clock times, so on the night
    clocks go back a 02:30 rule fires at the first 02:30 only, as cron does.
    """
    moment = moment.astimezone(UTC) + timedelta(microseconds=1)
    current: datetime | None = trigger.get_next_fire_time(previous, moment)
    for _ in range(4):  # a repeated wall time is skipped at most once per fire
        if current is None or not (isinstance(trigger, CronTrigger) and _repeated(current)):
            break
        current = trigger.get_next_fire_time(
            current, current.astimezone(UTC) + timedelta(microseconds=1)
        )
    return current


def _repeated(moment: datetime) -> bool:
    """A local time on its second pass (the hour repeated when clocks go back)."""
    return moment.fold == 1 and moment.utcoffset() != moment.replace(fold=0).utcoffset()


def fire_times(
    trigger: BaseTrigger, start: datetime, end: datetime, limit: int = 10_000
) -> list[datetime]:
    """Fire times in (start, end], bounded."""
    times: list[datetime] = []
    current = _after(trigger, None, start)
    while current is not None and current <= end and len(times) < limit:
        times.append(current)
        current = _after(trigger, current, current)
    return times


def latest_fire(trigger: BaseTrigger, now: datetime, window: timedelta) -> datetime | None:
    """The last fire time in (now - window, now]. The search widens backwards from a second,
    so a frequent schedule costs a few steps, not every fire of a long window (a day of
    ``every: 1s`` is 86,400 fires, more than ``fire_times`` would even list)."""
    span = min(window, timedelta(seconds=1))
    while True:
        found = fire_times(trigger, now - span, now)
        if found:
            return found[-1]
        if span >= window:
            return None
        span = min(window, span * 4)


def next_fire_times(schedule: Schedule, now: datetime, count: int = 3) -> list[datetime]:
    trigger = trigger_for(schedule)
    times: list[datetime] = []
    current = _after(trigger, None, now - timedelta(microseconds=1))
    while current is not None and len(times) < count:
        times.append(current)
        current = _after(trigger, current, current)
    return times


class Scheduler:
    def __init__(self, fire: Fire, clock: Callable[[], datetime] | None = None) -> None:
        self.fire = fire
        self.clock = clock or (lambda: datetime.now(UTC))
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        # One job per distinct schedule (rule, time zone, grace...), whatever the number of
        # flows on it: with a job per flow, APScheduler took 0.12 s on the loop to hand out
        # 1,000 flows due at the same minute. Job id -> the (flow, schedule index) on it.
        self._groups: dict[str, list[tuple[str, int]]] = {}

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def sync(self, flows: dict[str, Flow]) -> None:
        """Make the jobs match the flows' schedules (after a start or a reload). A job whose
        schedule is still wanted is kept as it is, whichever flows now use it."""
        wanted: dict[str, list[tuple[str, int]]] = {}
        schedules: dict[str, Schedule] = {}
        for flow in flows.values():
            for index, schedule in enumerate(flow.schedules):
                job_id = schedule.model_dump_json()
                wanted.setdefault(job_id, []).append((flow.name, index))
                schedules[job_id] = schedule
        for job_id in list(self._groups):
            if job_id not in wanted:
                self._scheduler.remove_job(job_id)
                del self._groups[job_id]
        for job_id, members in wanted.items():
            if job_id not in self._groups:
                schedule = schedules[job_id]
                trigger = trigger_for(schedule)
                self._scheduler.add_job(
                    self._on_fire,
                    trigger,
                    args=(job_id, trigger),
                    id=job_id,
                    misfire_grace_time=int(schedule.grace.total_seconds()) or 1,
                    coalesce=True,
                    max_instances=100,
                )
            self._groups[job_id] = members

    def job_of(self, flow: str, index: int = 0) -> Any:
        """The APScheduler job that fires this schedule of this flow (None if none)."""
        for job_id, members in self._groups.items():
            if (flow, index) in members:
                return self._scheduler.get_job(job_id)
        return None

    def every(self, job_id: str, interval: timedelta, job: Callable[[], Awaitable[Any]]) -> None:
        """A housekeeping job (reminder checks, notification delivery) on an interval."""
        self._scheduler.add_job(
            job,
            IntervalTrigger(seconds=interval.total_seconds()),
            id=job_id,
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )

    async def catch_up(self, flows: dict[str, Flow]) -> int:
        """Fires missed while the runner was down: the latest one within the grace period,
        for schedules with ``catch_up: latest``. Its key makes it a no-op if it already ran."""
        count = 0
        now = self.clock()
        for flow in flows.values():
            for index, schedule in enumerate(flow.schedules):
                if schedule.catch_up != "latest":
                    continue
                missed = latest_fire(trigger_for(schedule), now, schedule.grace)
                if missed is not None:
                    await self.fire(flow.name, index, missed)
                    count += 1
        return count

    async def _on_fire(self, job_id: str, trigger: Any) -> None:
        # A coroutine, so that APScheduler runs it on the event loop: a plain function would
        # run in a worker thread, and the dispatcher's wake-up event is not thread-safe.
        # APScheduler does not pass the scheduled time; the latest fire time at or before
        # now is it (APScheduler never runs a job before its time, and at most a grace
        # period late).
        fired_at = latest_fire(trigger, self.clock(), timedelta(days=1))
        if fired_at is None:
            return
        members = list(self._groups.get(job_id, ()))
        # All at once: their intakes share the next group commit of the state store.
        results = await asyncio.gather(
            *(self.fire(flow, index, fired_at) for flow, index in members),
            return_exceptions=True,
        )
        for (flow, _), result in zip(members, results, strict=True):
            if isinstance(result, Exception):
                log.error("schedule fire of %s failed to queue", flow, exc_info=result)
