"""Keeps run history in the state store by listening to run events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from flowrunner.events import EventBus, RunEvent
from flowrunner.store.runs import RunHistory, RunRecord

# A run still going after this long is written as running, so that `runs list` and the
# status endpoint show it; most runs end sooner and are then written once, whole.
SHOW_RUNNING_AFTER = 0.5


class HistoryRecorder:
    """Writes each run to the history with the group commits of the state store.

    A run's end is awaited by the engine (so a finished run is on disk when ``flowrunner
    run`` exits or a webhook answers); its start is written only if it lasts. A run that
    was in flight when the process died is known from its intake row (see the dispatcher's
    recovery), not from this early write.

    Runs that last are found by one sweep every half ``show_running_after`` while runs
    are in flight, rather than by a timer per run: most runs end long before, and a
    timer set and cancelled for each costs more than the look-up.
    """

    def __init__(self, history: RunHistory, show_running_after: float = SHOW_RUNNING_AFTER):
        self.history = history
        self.show_running_after = show_running_after
        # Runs in flight whose start is not written yet, in the order they started.
        self._unwritten: dict[str, tuple[float, RunRecord]] = {}
        self._written: set[str] = set()  # in flight, start written
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_loop: asyncio.AbstractEventLoop | None = None

    def on_event(self, event: RunEvent) -> Awaitable[None] | None:
        run = event.run
        if event.kind == "run_started":
            self._unwritten[run.id] = (time.monotonic(), run)
            if self._sweep is None or self._sweep_loop is not asyncio.get_running_loop():
                self._schedule_sweep()  # (a recorder may outlive the loop it swept in)
            return None
        if self._unwritten.pop(run.id, None) is not None:
            return self.history.write_finished(run, started_written=False)
        written = run.id in self._written
        self._written.discard(run.id)
        return self.history.write_finished(run, started_written=written)

    def _schedule_sweep(self) -> None:
        loop = self._sweep_loop = asyncio.get_running_loop()
        self._sweep = loop.call_later(self.show_running_after / 2, self._write_lasting)

    def _write_lasting(self) -> None:
        """Write as running every run that has lasted ``show_running_after``."""
        self._sweep = None
        due = time.monotonic() - self.show_running_after
        for run_id, (started, run) in list(self._unwritten.items()):
            if started > due:
                break  # started in order: the rest are younger
            del self._unwritten[run_id]
            self._written.add(run_id)
            self.history.write_started(run)
        if self._unwritten:
            self._schedule_sweep()


def record_history(bus: EventBus, history: RunHistory) -> HistoryRecorder:
    recorder = HistoryRecorder(history)
    bus.subscribe(recorder.on_event)
    return recorder
