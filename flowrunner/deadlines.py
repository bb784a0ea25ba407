"""Deadlines for many short waits, kept by one timer per event loop instead of one each.

``asyncio.timeout`` arms a timer when its block starts and cancels it when the block
ends. On the path every http step takes, that cost about 20 us a request here (a tenth of
what the request itself costs the process). :class:`Deadlines` keeps the deadlines of
every block in a set, and one timer per loop, while any block is open, sweeps them every
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
        # Per event loop (one after another, or in threads of their own): the watches
        # open on it, and its sweeping timer while any is open.
        self._loops: dict[asyncio.AbstractEventLoop, _Sweep] = {}

    def start(self, seconds: float) -> Watch:
        """Watch the running task for ``seconds``: past them, it is cancelled. The caller
        closes the watch when done (in ``finally``), and asks it, on CancelledError,
        whether that was the deadline (the sync form of :meth:`within`, for the hottest
        paths)."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a running task")
        loop = task.get_loop()
        sweep = self._loops.get(loop)
        if sweep is None:
            for gone in [other for other in self._loops if other.is_closed()]:
                del self._loops[gone]  # a loop closed with its timer still set
            sweep = self._loops[loop] = _Sweep(self, loop)
        watch = Watch(sweep, task, loop.time() + seconds)
        sweep.open[watch] = None
        if sweep.timer is None:
            sweep.timer = loop.call_later(self.granularity, sweep.run)
        return watch

    def within(self, seconds: float) -> _Within:
        """``async with deadlines.within(seconds):`` raises TimeoutError past ``seconds``."""
        return _Within(self, seconds)


class _Sweep:
    """One event loop's open watches, and the timer that sweeps them."""

    __slots__ = ("deadlines", "loop", "open", "timer")

    def __init__(self, deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> None:
        self.deadlines = deadlines
        self.loop = loop
        self.open: dict[Watch, None] = {}  # an ordered set
        self.timer: asyncio.TimerHandle | None = None

    def run(self) -> None:
        self.timer = None
        now = self.loop.time()
        expired = [w for w in self.open if not w.expired and w.deadline <= now]
        if self.open:
            self.timer = self.loop.call_later(self.deadlines.granularity, self.run)
        else:
            self.deadlines._loops.pop(self.loop, None)  # keeps no finished loop alive
        for watch in expired:
            watch.expired = True
            watch.task.cancel()


class Watch:
    __slots__ = ("cancelling", "deadline", "expired", "settled", "sweep", "task")

    def __init__(self, sweep: _Sweep, task: asyncio.Task[object], deadline: float) -> None:
        self.sweep = sweep
        self.task = task
        self.deadline = deadline
        self.expired = False
        self.settled = False  # the deadline's cancellation taken back from the task
        self.cancelling = task.cancelling()

    def timed_out(self) -> bool:
        """Asked on CancelledError: True when the deadline was the only cancellation since
        the watch started (the CancelledError is then the watch's to turn into a timeout);
        False when someone else cancelled the task too."""
        return self.expired and self._settle() <= self.cancelling

    def close(self) -> None:
        self.sweep.open.pop(self, None)
        if self.expired:
            # As asyncio.timeout does, whatever the block raised: no cancellation of the
            # deadline's is left on the task for a later timeout to misread.
            self._settle()

    def _settle(self) -> int:
        if self.settled:
            return self.task.cancelling()
        self.settled = True
        return self.task.uncancel()


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
        timed_out = exc_type is asyncio.CancelledError and self.watch.timed_out()
        self.watch.close()
        if timed_out:
            raise TimeoutError(f"no answer within {self.seconds:g}s") from exc
