"""flowrunner.deadlines: many deadlines on one sweeping timer, with asyncio.timeout's
semantics (TimeoutError past the deadline; an outer cancellation is told apart)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from flowrunner.deadlines import Deadlines

GRANULARITY = 0.02


async def test_a_block_past_its_deadline_raises_timeout_error_soon_after() -> None:
    deadlines = Deadlines(GRANULARITY)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadlines.within(0.05):
            await asyncio.sleep(5)
    elapsed = time.monotonic() - started
    assert 0.05 <= elapsed < 0.5
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0.01)  # no stray cancellation left behind


async def test_blocks_in_time_finish_and_the_timer_stops_when_none_is_open() -> None:
    deadlines = Deadlines(GRANULARITY)

    async def quick(index: int) -> int:
        async with deadlines.within(1.0):
            await asyncio.sleep(0.001 * (index % 3))
        return index

    assert await asyncio.gather(*(quick(i) for i in range(50))) == list(range(50))
    await asyncio.sleep(GRANULARITY * 3)
    assert deadlines._loops == {}  # no timer left, and the loop not held


async def test_each_block_keeps_its_own_deadline() -> None:
    deadlines = Deadlines(GRANULARITY)

    async def wait(seconds: float, limit: float) -> str:
        try:
            async with deadlines.within(limit):
                await asyncio.sleep(seconds)
            return "done"
        except TimeoutError:
            return "timed out"

    results = await asyncio.gather(wait(0.01, 0.3), wait(1.0, 0.05), wait(0.02, 0.3))
    assert results == ["done", "timed out", "done"]


async def test_an_outer_cancellation_at_the_same_time_wins() -> None:
    """The task is cancelled from outside while its deadline also expires: the block lets
    CancelledError through, as asyncio.timeout does, so that the outer canceller (a
    step's timeout, a shutdown) sees its own cancellation."""
    deadlines = Deadlines(GRANULARITY)
    entered = asyncio.Event()

    async def body() -> None:
        watch = deadlines.start(0.0)  # expires at the first sweep
        entered.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            assert not watch.timed_out()  # someone else cancelled too
            raise
        finally:
            watch.close()

    task = asyncio.create_task(body())
    await entered.wait()
    watch_sweep = deadlines._loops[asyncio.get_running_loop()]
    watch_sweep.run()  # the deadline cancels the task; in the same instant, so do we
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outer_asyncio_timeout_that_expires_first_is_the_outer_one() -> None:
    deadlines = Deadlines(GRANULARITY)
    with pytest.raises(TimeoutError) as caught:
        async with asyncio.timeout(0.05):
            async with deadlines.within(10):
                await asyncio.sleep(5)
    assert "no answer within" not in str(caught.value)  # asyncio's own TimeoutError


def test_one_deadlines_serves_one_event_loop_after_another() -> None:
    """A runtime may be used by asyncio.run twice (the CLI): the sweep follows the loop."""
    deadlines = Deadlines(GRANULARITY)

    async def timed_out() -> bool:
        try:
            async with deadlines.within(0.03):
                await asyncio.sleep(1)
        except TimeoutError:
            return True
        return False

    assert asyncio.run(timed_out())
    assert asyncio.run(timed_out())


async def test_a_deadline_leaves_no_cancellation_behind_whatever_the_block_raised() -> None:
    """A block that turns the cancellation into another error: once it ends, the task
    carries no cancellation of the deadline's, so that an outer timeout still reads its
    own expiry as a timeout."""
    deadlines = Deadlines(GRANULARITY)
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(ValueError):
        watch = deadlines.start(0.02)
        try:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                raise ValueError("converted") from None
        finally:
            watch.close()
    assert task.cancelling() == 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            await asyncio.sleep(1)


def test_loops_running_at_once_in_threads_keep_their_own_deadlines() -> None:
    deadlines = Deadlines(GRANULARITY)
    elapsed: dict[str, float] = {}

    def run(name: str, limit: float) -> None:
        async def wait() -> None:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with deadlines.within(limit):
                    await asyncio.sleep(5)
            elapsed[name] = time.monotonic() - started

        asyncio.run(wait())

    threads = [
        threading.Thread(target=run, args=("short", 0.1)),
        threading.Thread(target=run, args=("long", 0.6)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert 0.1 <= elapsed["short"] < 0.4
    assert 0.6 <= elapsed["long"] < 1.2
