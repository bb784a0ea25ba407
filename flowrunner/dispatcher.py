"""Takes runs from the durable queue and executes them within the concurrency limits.

Intake (webhooks, schedule fires) only ever writes to the queue; this loop is the one
place that starts runs, so per-flow limits, the global limit and restarts after a crash
are decided here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flowrunner.auth.jwt import user_of_credential
from flowrunner.deadlines import Deadlines
from flowrunner.engine import Engine, new_run_id
from flowrunner.errors import FlowrunnerError
from flowrunner.runtime import INTERRUPTED_MESSAGE, RunStatus
from flowrunner.store.batch import Deferred
from flowrunner.store.queue import Dedupe, Duplicate, QueuedRun, RunQueue
from flowrunner.store.runs import RunHistory, RunRecord

log = logging.getLogger("flowrunner.dispatcher")
POLL_SECONDS = 1.0
# A run whose caller waits for its end (a webhook with `respond: wait`) starts before its
# intake row is written. If it ends within this long, that row is never written: the
# run's history, committed before the caller is answered, is its one write (one commit a
# webhook instead of two). If it lasts longer, the row is written then, or with any commit
# that comes sooner, and a crash finds the run as it finds any other.
STORE_WAITED_RUN_AFTER = 0.05


@dataclass(frozen=True)
class Submitted:
    run_id: str
    status: str  # queued | duplicate | skipped | failed
    reason: str | None = None


class Dispatcher:
    def __init__(
        self,
        queue: RunQueue,
        history: RunHistory,
        engine: Callable[[], Engine],
        max_in_flight: int = 64,
    ) -> None:
        self.queue = queue
        self.history = history
        self.engine = engine
        self.max_in_flight = max_in_flight
        self._wake = asyncio.Event()
        self._running: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, list[asyncio.Future[RunRecord]]] = {}
        self._stopping = False
        self._idle = False  # the last look at the queue found nothing waiting
        self._reserved = 0  # slots taken by runs being stored, about to start
        self._storing: dict[str, int] = {}  # runs being stored, by flow
        self._deadlines = Deadlines()  # of the webhooks waiting for their runs
        self._intakes: dict[str, Deferred] = {}  # runs started before they were stored
        # Told of runs refused at intake (skipped, failed): they never reach the engine,
        # whose events feed the metrics.
        self.on_refused: Callable[[RunRecord], None] | None = None

    def is_running(self, run_id: str) -> bool:
        """Whether the run is in flight on this node (whatever the store holds yet)."""
        return run_id in self._tasks

    @property
    def in_flight(self) -> int:
        return len(self._tasks) + self._reserved

    # ------------------------------------------------------------ intake

    async def submit(
        self,
        flow_name: str,
        trigger: dict[str, Any],
        inputs: dict[str, Any] | None = None,
        user_token: str | None = None,
        dedupe: Dedupe | None = None,
        caller_waits: bool = False,
    ) -> Submitted:
        """Store a run durably (the caller may acknowledge once this returns).

        With ``caller_waits`` (the caller answers only once the run has ended, or after
        ``stored``), a run that can start at once is started before it is stored; see
        ``STORE_WAITED_RUN_AFTER``. Not with a dedupe key, nor for a flow that skips or
        fails when busy: those decide on what is stored."""
        flow = self.engine().flow(flow_name)
        run_id = new_run_id()
        limit = flow.concurrency
        # Runs waiting in the queue count too, and those being stored: two webhooks in the
        # same instant must not both pass a `when_busy: skip` flow.
        if limit.when_busy != "queue":
            busy = self.queue.active(flow.name) + self._storing.get(flow.name, 0)
            if busy >= limit.limit:
                reason = f"flow {flow.name} is busy ({limit.limit} run(s) in flight)"
                status = RunStatus.SKIPPED if limit.when_busy == "skip" else RunStatus.FAILED
                self._record_refused(
                    run_id, flow.name, trigger, inputs or {}, status, reason, user_token
                )
                return Submitted(run_id, status, reason)
        queued = QueuedRun(run_id, flow.name, trigger, inputs or {}, user_token, datetime.now(UTC))
        # Start at once when nothing waits ahead of it and there is room: the row is stored
        # already claimed, and no trip through the dispatch loop is needed. The slot is
        # taken now, before the write, so that runs stored together cannot overfill it.
        start_now = (
            self._idle
            and not self._stopping
            and self.in_flight < self.max_in_flight
            and self._running.get(flow.name, 0) < limit.limit
        )
        if start_now and caller_waits and dedupe is None and limit.when_busy == "queue":
            intake = self.queue.enqueue_started(queued, STORE_WAITED_RUN_AFTER)
            self._intakes[run_id] = intake
            self._start(flow.name, queued, intake)
            return Submitted(run_id, "queued")
        if start_now:
            self._reserve(flow.name, 1)
        self._storing[flow.name] = self._storing.get(flow.name, 0) + 1
        try:
            await self.queue.enqueue(queued, dedupe, claim=start_now)
        except BaseException as exc:
            if start_now:
                self._reserve(flow.name, -1)
            if isinstance(exc, Duplicate):
                return Submitted(exc.run_id, "duplicate")
            raise
        finally:
            self._storing[flow.name] -= 1
        if start_now:
            self._reserve(flow.name, -1)
            self._start(flow.name, queued)
        else:
            self._idle = False
            self._wake.set()
        return Submitted(run_id, "queued")

    def _reserve(self, flow: str, count: int) -> None:
        self._reserved += count
        self._running[flow] = self._running.get(flow, 0) + count

    def _start(self, flow: str, queued: QueuedRun, intake: Deferred | None = None) -> None:
        # The intake row goes with the run's history, in the same commit.
        self.history.finish_with(queued.id, self.queue.finish_rows(queued.id), intake)
        self._running[flow] = self._running.get(flow, 0) + 1
        self._tasks[queued.id] = asyncio.create_task(self._execute(queued), name=f"run {queued.id}")

    def _record_refused(
        self,
        run_id: str,
        flow: str,
        trigger: dict[str, Any],
        inputs: dict[str, Any],
        status: str,
        reason: str,
        user_token: str | None,
    ) -> None:
        now = datetime.now(UTC)
        record = RunRecord(
            run_id,
            flow,
            status,
            _without_secrets(trigger),
            inputs,
            now,
            now,
            error=reason,
            user=user_of_credential(user_token),
        )
        self.history.record(record)
        if self.on_refused is not None:
            self.on_refused(record)

    async def stored(self, run_id: str) -> None:
        """Return once the run is on disk: its intake row, or its history if it ended
        first (what must hold before its caller is told it was accepted)."""
        intake = self._intakes.get(run_id)
        if intake is not None:
            await asyncio.shield(intake.written)

    async def wait_for(self, run_id: str, seconds: float) -> RunRecord | None:
        """The finished run, or None if it is still going after ``seconds``."""
        # A run in flight here has not finished. Any other (queued, or a duplicate of a
        # run that may have ended) is looked up in the history by its exact id.
        if run_id not in self._tasks:
            done = self.history.get_run(run_id, exact=True)
            if done is not None and done.status not in (RunStatus.RUNNING, RunStatus.QUEUED):
                return done
        future: asyncio.Future[RunRecord] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, []).append(future)
        try:
            async with self._deadlines.within(seconds):
                return await future
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(run_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(run_id, None)

    # ------------------------------------------------------------ the loop

    def recover(self) -> None:
        """After a crash: runs that were mid-flight are marked interrupted, and restarted
        when their flow says so; queued runs simply start again."""
        for queued in self.queue.abandoned():
            record = self.history.get_run(queued.id, exact=True)
            if record is not None and record.status not in (
                RunStatus.RUNNING,
                RunStatus.INTERRUPTED,
            ):
                # It finished, and the process died before it removed the intake row.
                self.queue.finish(queued.id)
                continue
            if record is None:
                # It was claimed, so it had started; it died before its history was written.
                now = datetime.now(UTC)
                self.history.record(
                    RunRecord(
                        queued.id,
                        queued.flow,
                        RunStatus.INTERRUPTED,
                        _without_secrets(queued.trigger),
                        queued.inputs,
                        queued.created_at,
                        now,
                        error=INTERRUPTED_MESSAGE,
                        user=user_of_credential(queued.user_token),
                    )
                )
            else:
                self.history.set_status(queued.id, RunStatus.INTERRUPTED, INTERRUPTED_MESSAGE)
            self.queue.finish(queued.id)
            try:
                flow = self.engine().flow(queued.flow)
            except FlowrunnerError:
                continue
            if flow.on_interrupt == "restart":
                again = QueuedRun(
                    new_run_id(),
                    queued.flow,
                    queued.trigger,
                    queued.inputs,
                    queued.user_token,
                    datetime.now(UTC),
                )
                self.queue.enqueue_now(again)
                log.info("restarting interrupted run %s as %s", queued.id, again.id)

    async def run_forever(self) -> None:
        while not self._stopping:
            try:
                self._start_eligible()
            except Exception:
                log.exception("the dispatcher could not read the queue; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
            self._wake.clear()

    def _start_eligible(self) -> None:
        free = self.max_in_flight - self.in_flight
        if free <= 0:
            return
        waiting = self.queue.waiting()
        # Nothing waiting: new submissions may start straight away (see submit).
        self._idle = not waiting
        chosen: list[str] = []
        planned: dict[str, int] = {}
        for run_id, flow_name in waiting:
            if len(chosen) >= free or self._stopping:
                break
            if run_id in self._tasks:
                continue
            try:
                limit = self.engine().flow(flow_name).concurrency.limit
            except FlowrunnerError:
                limit = free  # taken, then recorded as failed below
            if self._running.get(flow_name, 0) + planned.get(flow_name, 0) >= limit:
                continue  # when_busy: queue — it waits its turn
            planned[flow_name] = planned.get(flow_name, 0) + 1
            chosen.append(run_id)
        # One statement for all of them; a run another worker took is simply not returned.
        for queued in self.queue.claim_many(chosen):
            try:
                flow = self.engine().flow(queued.flow)
            except FlowrunnerError as exc:
                self._record_refused(
                    queued.id,
                    queued.flow,
                    queued.trigger,
                    queued.inputs,
                    RunStatus.FAILED,
                    exc.message,
                    queued.user_token,
                )
                self.queue.finish(queued.id)
                continue
            self._start(flow.name, queued)

    async def _execute(self, queued: QueuedRun) -> None:
        try:
            record = await self.engine().run(
                queued.flow,
                trigger=queued.trigger,
                inputs=queued.inputs,
                user_token=queued.user_token,
                run_id=queued.id,
            )
        except FlowrunnerError as exc:
            now = datetime.now(UTC)
            record = RunRecord(
                queued.id,
                queued.flow,
                RunStatus.FAILED,
                {},
                queued.inputs,
                now,
                now,
                error=exc.message,
                user=user_of_credential(queued.user_token),
            )
            self.history.record(record)
        except asyncio.CancelledError:
            # Shutting down: the engine recorded the run as interrupted (this covers a run
            # cancelled before it began); the queue row stays claimed, and the next start
            # restarts the run if its flow says `on_interrupt: restart`.
            self.history.set_status(queued.id, RunStatus.INTERRUPTED, INTERRUPTED_MESSAGE)
            self.history.forget(queued.id)
            self._done(queued.flow, queued.id)
            raise
        if self.history.forget(queued.id):  # no history was written with it
            intake = self._intakes.get(queued.id)
            if intake is None or not intake.take_back():  # else never written
                self.queue.finish_later(queued.id)
        self._done(queued.flow, queued.id)
        for future in self._waiters.pop(queued.id, []):
            if not future.done():
                future.set_result(record)
        if not self._idle:
            self._wake.set()  # a waiting run may now have room

    def _done(self, flow: str, run_id: str) -> None:
        self._running[flow] = max(0, self._running.get(flow, 1) - 1)
        self._tasks.pop(run_id, None)
        self._intakes.pop(run_id, None)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop starting runs; let those in flight finish for ``grace`` seconds, then cancel
        them (they are marked interrupted on the next start)."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)


def _without_secrets(trigger: dict[str, Any]) -> dict[str, Any]:
    headers = {
        k: ("***" if k.lower() in ("authorization", "cookie", "x-api-key") else v)
        for k, v in (trigger.get("headers") or {}).items()
    }
    return {**trigger, "headers": headers} if "headers" in trigger else trigger
