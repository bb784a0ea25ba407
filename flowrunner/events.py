"""Run events: the engine publishes them, history and notifications subscribe.

The engine never imports its subscribers; whoever composes the application connects them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from flowrunner.store.runs import RunRecord

log = logging.getLogger("flowrunner.events")

EventKind = Literal["run_started", "run_finished"]


@dataclass(frozen=True)
class RunEvent:
    kind: EventKind
    run: RunRecord


Subscriber = Callable[[RunEvent], Awaitable[None] | None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    async def publish(self, event: RunEvent) -> None:
        for subscriber in self._subscribers:
            try:
                result = subscriber(event)
                if result is not None:
                    await result
            except Exception:
                # A broken subscriber must not fail the run it observes.
                log.exception("run event subscriber failed on %s", event.kind)
