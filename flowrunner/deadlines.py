"""Deadlines for many short waits, kept by one timer instead of one each.

``asyncio.timeout`` arms a timer when its block starts and cancels it when the block
ends. On the path every http step takes, that cost about 20 us a request here (a tenth of
what the request itself costs the process). :class:`Deadlines` keeps the deadlines of
every block in a set, and one timer, while any block is open, sweeps them every
``granularity`` seconds: a block past its deadline has its task cancelled, and the block
raises ``TimeoutError``, as ``asyncio.timeout`` does. A deadline is thus kept up to
``granularity`` late.

As with ``asyncio.timeout``, an outer cancellation (another timeout, a shutdown) that
arrives at the same moment is told apart, and wins: the block then lets the
``CancelledError`` through.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

GRANULARITY = 0.05  # seconds


class Deadlines:
    def __init__(self, granularity: float = GRANULARITY) -> None:
        self.granularity = granularity
        self._open: dict[Watch, None] = {}  # an ordered set
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, seconds: float) -> Watch:
        """Watch the running task for ``seconds``: past them, it is cancelled. The caller
        closes the watch when done, and asks it, on CancelledError, whether that was the
        deadline (the sync form of :meth:`within`, for the hottest paths)."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a running task")
        loop = task.get_loop()
        watch = Watch(self, task, loop.time() + seconds)
        self._open[watch] = None
        if self._sweep is None or self._loop is not loop:
            self._loop = loop
            self._sweep = loop.call_later(self.granularity, self._sweep_once)
        return watch

    def within(self, seconds: float) -> _Within:
        """``async with deadlines.within(seconds):`` raises TimeoutError past ``seconds``."""
        return _Within(self, seconds)

    def _sweep_once(self) -> None:
        loop, self._sweep = self._loop, None
        if loop is None:
            return
        now = loop.time()
        for watch in list(self._open):
            if not watch.expired and watch.deadline <= now:
                watch.expired = True
                watch.task.cancel()
        if self._open:
            self._sweep = loop.call_later(self.granularity, self._sweep_once)

    def close(self) -> None:
        """Stop the sweeping timer (the watches still open keep no deadline)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None


class Watch:
    __slots__ = ("cancelling", "deadline", "deadlines", "expired", "task")

    def __init__(self, deadlines: Deadlines, task: asyncio.Task[object], deadline: float) -> None:
        self.deadlines = deadlines
        self.task = task
        self.deadline = deadline
        self.expired = False
        self.cancelling = task.cancelling()

    def close(self) -> None:
        self.deadlines._open.pop(self, None)

    def timed_out(self) -> bool:
        """Asked on CancelledError: True when the deadline was the only cancellation since
        the watch started (the CancelledError is then the watch's to turn into a timeout);
        False when someone else cancelled the task too."""
        return self.expired and self.task.uncancel() <= self.cancelling


class _Within:
    __slots__ = ("deadlines", "seconds", "watch")

    def __init__(self, deadlines: Deadlines, seconds: float) -> None:
        self.deadlines = deadlines
        self.seconds = seconds

    async def __aenter__(self) -> None:
        self.watch = self.deadlines.start(self.seconds)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.watch.close()
        if exc_type is asyncio.CancelledError and self.watch.timed_out():
            raise TimeoutError(f"no answer within {self.seconds:g}s") from exc
