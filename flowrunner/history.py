"""Keeps run history in the state store by listening to run events."""

from __future__ import annotations

from flowrunner.events import EventBus, RunEvent
from flowrunner.store.runs import RunHistory


def record_history(bus: EventBus, history: RunHistory) -> None:
    def on_event(event: RunEvent) -> None:
        if event.kind == "run_started":
            history.record_started(event.run)
        else:
            history.record_finished(event.run)

    bus.subscribe(on_event)
