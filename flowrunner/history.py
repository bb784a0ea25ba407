"""Keeps run history in the state store by listening to run events."""

from __future__ import annotations

import asyncio
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
    """

    def __init__(self, history: RunHistory, show_running_after: float = SHOW_RUNNING_AFTER):
        self.history = history
        self.show_running_after = show_running_after
        self._starts: dict[str, asyncio.TimerHandle | None] = {}

    def on_event(self, event: RunEvent) -> Awaitable[None] | None:
        run = event.run
        if event.kind == "run_started":
            self._starts[run.id] = asyncio.get_running_loop().call_later(
                self.show_running_after, self._write_start, run
            )
            return None
        written = run.id in self._starts and self._starts[run.id] is None
        pending = self._starts.pop(run.id, None)
        if pending is not None:
            pending.cancel()
        return self.history.write_finished(run, started_written=written)

    def _write_start(self, run: RunRecord) -> None:
        self._starts[run.id] = None
        self.history.write_started(run)


def record_history(bus: EventBus, history: RunHistory) -> HistoryRecorder:
    recorder = HistoryRecorder(history)
    bus.subscribe(recorder.on_event)
    return recorder
