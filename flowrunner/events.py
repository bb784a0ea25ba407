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

    def notify(self, event: RunEvent) -> Awaitable[None] | None:
        """Tell the subscribers, in order. A subscriber may return something to wait for
        (the history, its write): the rest are told once it is done, and what to await
        for that is returned. None when nobody needs waiting for, as for most events: no
        coroutine made for them (two a run, on the path every run takes)."""
        for index, subscriber in enumerate(self._subscribers):
            try:
                result = subscriber(event)
            except Exception:
                # A broken subscriber must not fail the run it observes.
                log.exception("run event subscriber failed on %s", event.kind)
                continue
            if result is not None:
                return self._after(event, result, index + 1)
        return None

    async def publish(self, event: RunEvent) -> None:
        """Tell the subscribers, in order, each awaited before the next is told."""
        pending = self.notify(event)
        if pending is not None:
            await pending

    async def _after(self, event: RunEvent, pending: Awaitable[None], start: int) -> None:
        try:
            await pending
        except Exception:
            log.exception("run event subscriber failed on %s", event.kind)
        for subscriber in self._subscribers[start:]:
            try:
                result = subscriber(event)
                if result is not None:
                    await result
            except Exception:
                log.exception("run event subscriber failed on %s", event.kind)
