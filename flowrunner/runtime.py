"""What a running flow carries: statuses, the expression scope, and the run's context.

Step modules use these types; the engine creates them. Neither imports the other's
internals: nested steps run through :meth:`RunContext.run_steps`, which the engine provides.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from flowrunner.errors import FlowrunnerError
from flowrunner.expressions import compile_template, condition_source, render
from flowrunner.secrets import Masker
from flowrunner.store.runs import StepRecord
from flowrunner.wire import Wire, WireAuth

if TYPE_CHECKING:
    from flowrunner.model import Step
    from flowrunner.model.profiles import ProfileBase


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    SKIPPED = "skipped"


INTERRUPTED_MESSAGE = "the runner stopped while this run was in flight"


class StepStatus(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CONTINUED = "continued"  # failed, and the flow went on (on_error: continue)


class StepFailed(FlowrunnerError):
    """A step failed."""

    def __init__(self, message: str, *, step: str | None = None, result: Any = None) -> None:
        super().__init__(message)
        self.step = step
        self.result = result
        self.call: Any = None  # the http exchange that failed, for the history


class FlowFailed(StepFailed):
    """A ``fail`` step ended the run."""


class AuthProvider(Protocol):
    """Gives the auth flow that applies an auth profile's credential to a request."""

    def profile(self, name: str) -> ProfileBase: ...

    async def auth_for(self, name: str, run: RunContext) -> WireAuth: ...


@dataclass
class Scope:
    """The names an expression sees at one place in a run."""

    names: dict[str, Any]
    run: RunContext

    def child(self, **extra: Any) -> Scope:
        names = dict(self.names)
        names["steps"] = dict(self.names["steps"])
        names.update(extra)
        return Scope(names, self.run)

    @property
    def steps(self) -> dict[str, Any]:
        steps: dict[str, Any] = self.names["steps"]
        return steps

    def render(self, value: Any) -> Any:
        return render(value, self.names)

    def condition(self, text: str) -> Any:
        return compile_template(condition_source(text)).render(self.names)


@dataclass
class RunContext:
    """One run in progress: who started it, what it has recorded, how to reach the world."""

    run_id: str
    flow_name: str
    started_at: datetime
    masker: Masker
    client: httpx.AsyncClient  # token endpoints and other calls outside the http step
    wire: Wire  # what the http step sends its requests through
    auth: AuthProvider
    run_steps: Callable[[list[Step], Scope, str], Awaitable[None]]
    call_flow: Callable[[str, dict[str, Any], RunContext, str], Awaitable[Any]]
    user_token: str | None = None
    # What triggered the run, for connected-user profiles whose token is an expression.
    trigger: dict[str, Any] = field(default_factory=dict)
    user: str | None = None
    dry_run: bool = False
    records: list[StepRecord] = field(default_factory=list)
    response: dict[str, Any] | None = None
    on_step: Callable[[StepRecord], None] | None = None
    body_limit: int = 10 * 1024 * 1024
    excerpt_limit: int = 4096

    def record(self, record: StepRecord) -> None:
        record.seq = len(self.records)
        if record.error:
            record.error = self.masker.mask(record.error)
        if record.message:
            record.message = self.masker.mask(record.message)
        self.records.append(record)
        if self.on_step is not None:
            self.on_step(record)

    def excerpt(self, value: Any) -> Any:
        """A bounded, masked form of a body for the history (the value itself when it is
        small and holds no secret)."""
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, str):
            # Mask before cutting, so that a secret across the cut leaves no prefix behind.
            text = self.masker.mask(value)[: self.excerpt_limit]
            suffix = f"... ({len(value)} characters)" if len(value) > self.excerpt_limit else ""
            return text + suffix
        masked, text = self.masker.mask_with_text(value)
        if len(text) > self.excerpt_limit:
            return text[: self.excerpt_limit] + f"... ({len(text)} characters)"
        return masked


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a perf_counter), to the microsecond."""
    return int((time.perf_counter() - started) * 1_000_000) / 1000  # round() costs more


StepResult = dict[str, Any]


def step_result(
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    outputs: Any = None,
    error: str | None = None,
) -> StepResult:
    return {
        "status": status,
        "headers": dict(headers or {}),
        "body": body,
        "outputs": {} if outputs is None else outputs,
        "error": error,
    }
