"""The run event bus: subscribers told in order, a write awaited before the next is told,
and a broken subscriber never failing the run it observes."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest

from flowrunner.events import EventBus, RunEvent
from flowrunner.store.runs import RunRecord


def event(kind: str = "run_finished") -> RunEvent:
    now = datetime.now(UTC)
    return RunEvent(kind, RunRecord("r-1", "flow", "succeeded", {}, {}, now, now))  # type: ignore[arg-type]


async def test_subscribers_are_told_in_order_each_wait_done_before_the_next() -> None:
    told: list[str] = []
    bus = EventBus()

    async def slow_write() -> None:
        await asyncio.sleep(0.01)
        told.append("written")

    bus.subscribe(lambda e: told.append("first") or None)
    bus.subscribe(lambda e: slow_write())
    bus.subscribe(lambda e: told.append("last") or None)
    await bus.publish(event())
    assert told == ["first", "written", "last"]


async def test_nothing_to_wait_for_needs_no_await() -> None:
    """An event nobody waits on (a run's start) is told at once: notify returns None."""
    told: list[str] = []
    bus = EventBus()
    bus.subscribe(lambda e: told.append(e.kind) or None)
    assert bus.notify(event("run_started")) is None
    assert told == ["run_started"]


async def test_a_broken_subscriber_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    told: list[str] = []
    bus = EventBus()

    def broken(e: RunEvent) -> None:
        raise RuntimeError("boom")

    async def failing_write() -> None:
        raise OSError("disk full")

    bus.subscribe(broken)
    bus.subscribe(lambda e: failing_write())
    bus.subscribe(lambda e: told.append("after") or None)
    with caplog.at_level(logging.ERROR, logger="flowrunner.events"):
        await bus.publish(event())
    assert told == ["after"]
    assert [r.exc_info[1].args[0] for r in caplog.records if r.exc_info] == ["boom", "disk full"]
