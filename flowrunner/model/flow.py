"""The model of a flow (flows/*.yaml): triggers, inputs, vars and steps.

Strings may hold ``${{ }}`` expressions; the models keep them as text and the loader
compiles and checks them. Structural fields (durations, counts, enums) are plain values.
"""

from __future__ import annotations

import zoneinfo
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from flowrunner.model.base import Duration, Name, StatusPattern, StepId, StrictModel, closest
from flowrunner.model.cron import CRON_HINT, check_cron

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


def _upper_method(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


# ---------------------------------------------------------------- triggers


class Schedule(StrictModel):
    cron: str | None = None
    every: Duration | None = None
    timezone: str = "UTC"
    catch_up: Literal["none", "latest"] = "latest"
    grace: Duration = timedelta(hours=1)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            problem = check_cron(value)
            if problem:
                raise PydanticCustomError(
                    "cron", "{problem}", {"problem": problem, "hint": CRON_HINT}
                )
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            suggestion = closest(value, zoneinfo.available_timezones())
            raise PydanticCustomError(
                "timezone",
                "unknown timezone '{value}'",
                {
                    "value": value,
                    "hint": f"did you mean '{suggestion}'?"
                    if suggestion
                    else "an IANA name such as Europe/Paris or UTC",
                },
            ) from exc
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> Schedule:
        if (self.cron is None) == (self.every is None):
            raise PydanticCustomError(
                "schedule_rule",
                "a schedule needs exactly one of 'cron' or 'every'",
                {
                    "hint": 'schedule: {cron: "0 7 * * MON-FRI", timezone: Europe/Paris}  or  '
                    "schedule: {every: 15m}"
                },
            )
        if self.every is not None and self.every < timedelta(seconds=1):
            raise PydanticCustomError("schedule_rule", "'every' must be at least 1s", {})
        return self


class ScheduleTrigger(StrictModel):
    schedule: Schedule


class HmacAuth(StrictModel):
    secret: str
    header: str = "X-Signature"
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    prefix: str = ""
    encoding: Literal["hex", "base64"] = "hex"
    timestamp_header: str | None = None
    tolerance: Duration = timedelta(minutes=5)


class BearerAuth(StrictModel):
    token: str


class BasicAuth(StrictModel):
    username: str
    password: str


class WebhookAuth(StrictModel):
    """Exactly one way for a caller to prove who it is; ``auth: none`` must be written out."""

    hmac: HmacAuth | None = None
    bearer: BearerAuth | None = None
    basic: BasicAuth | None = None
    connected_user: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> WebhookAuth:
        chosen = [k for k in ("hmac", "bearer", "basic") if getattr(self, k) is not None]
        if self.connected_user:
            chosen.append("connected_user")
        if len(chosen) != 1:
            raise PydanticCustomError(
                "webhook_auth",
                "webhook auth needs exactly one of hmac, bearer, basic, connected_user "
                "(or the word none)",
                {
                    "hint": 'auth: {hmac: {secret: "${{ secrets.HOOK_SECRET }}"}}',
                    "at": chosen[1] if len(chosen) > 1 else "",
                },
            )
        return self


class Dedupe(StrictModel):
    key: str
    for_: Duration = Field(default=timedelta(hours=24), alias="for")


class Webhook(StrictModel):
    path: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_/-]*$", max_length=200)]
    methods: list[Annotated[HttpMethod, Field()]] = ["POST"]
    auth: WebhookAuth | Literal["none"]
    respond: Literal["wait", "immediate"] = "immediate"
    timeout: Duration = timedelta(seconds=30)
    dedupe: Dedupe | None = None
    max_body: int = Field(default=1_048_576, ge=1, le=100 * 1_048_576)

    @field_validator("methods", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return [_upper_method(v) for v in value] if isinstance(value, list) else value


class WebhookTrigger(StrictModel):
    webhook: Webhook


def _trigger_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [k for k in ("schedule", "webhook") if k in value]
        if len(kinds) == 1:
            return f"{kinds[0]}-trigger"
    elif isinstance(value, ScheduleTrigger):
        return "schedule-trigger"
    elif isinstance(value, WebhookTrigger):
        return "webhook-trigger"
    return None


Trigger = Annotated[
    Annotated[ScheduleTrigger, Tag("schedule-trigger")]
    | Annotated[WebhookTrigger, Tag("webhook-trigger")],
    Discriminator(
        _trigger_kind,
        custom_error_type="trigger_kind",
        custom_error_message="a trigger is either 'schedule' or 'webhook'",
    ),
]

# ---------------------------------------------------------------- flow-level settings


class InputSpec(StrictModel):
    type: Literal["string", "number", "integer", "boolean", "object", "array"] = "string"
    default: Any = None
    description: str = ""

    @property
    def required(self) -> bool:
        # An input with no `default` key is required; `default: null` makes it optional.
        return "default" not in self.model_fields_set


class Concurrency(StrictModel):
    limit: int = Field(default=1, ge=1, le=1000)
    when_busy: Literal["queue", "skip", "fail"] = "queue"


RetryCondition = Annotated[int | Literal["5xx", "4xx", "timeout", "connection"], Field()]


class Retry(StrictModel):
    attempts: int = Field(default=3, ge=1, le=50)
    backoff: Literal["exponential", "fixed"] = "exponential"
    delay: Duration = timedelta(seconds=1)
    max_delay: Duration = timedelta(seconds=60)
    on: list[RetryCondition] = [429, 502, 503, 504, "timeout", "connection"]

    @field_validator("on", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [
                v.lower()
                if isinstance(v, str) and not v.isdigit()
                else (int(v) if isinstance(v, str) else v)
                for v in value
            ]
        return value


# ---------------------------------------------------------------- steps


class StepBase(StrictModel):
    id: StepId
    if_: str | None = Field(default=None, alias="if")
    timeout: Duration | None = None
    retry: Retry | None = None
    on_error: Literal["fail", "continue"] = "fail"
    description: str = ""

    @property
    def kind(self) -> str:
        raise NotImplementedError

    def children(self) -> list[tuple[str, list[Step]]]:
        """Nested step lists with the key that holds each, for walking the tree."""
        return []


class CursorPagination(StrictModel):
    path: str  # JSONPath to the next cursor in the response body
    param: str  # query parameter that carries it on the next request


class PageParam(StrictModel):
    param: str
    start: int = 1
    step: int = Field(default=1, ge=1)


class Paginate(StrictModel):
    next_url: str | None = None
    next_cursor: CursorPagination | None = None
    page: PageParam | None = None
    items: str | None = None
    stop: str | None = None
    max_pages: int = Field(default=100, ge=1, le=100_000)

    @model_validator(mode="after")
    def _one_form(self) -> Paginate:
        forms = [f for f in ("next_url", "next_cursor", "page") if getattr(self, f) is not None]
        if len(forms) != 1:
            raise PydanticCustomError(
                "paginate_form",
                "paginate needs exactly one of next_url, next_cursor or page",
                {
                    "hint": 'paginate: {next_url: "$.next", items: "$.data[*]", max_pages: 50}',
                    "at": forms[1] if len(forms) > 1 else "",
                },
            )
        if self.page is not None and self.items is None and self.stop is None:
            raise PydanticCustomError(
                "paginate_stop",
                "page-number pagination needs 'items' (stops on an empty page) or 'stop'",
                {"hint": 'paginate: {page: {param: page}, items: "$.data[*]"}'},
            )
        return self


class HttpRequest(StrictModel):
    method: HttpMethod = "GET"
    url: str
    auth: str | None = None
    query: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    json_: Any = Field(default=None, alias="json")
    form: dict[str, Any] | None = None
    body: str | None = None
    timeout: Duration | None = None
    expect: list[StatusPattern] = ["2xx"]
    follow_redirects: bool = True
    paginate: Paginate | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return _upper_method(value)

    @field_validator("expect", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, int | str) else value

    @model_validator(mode="after")
    def _one_body(self) -> HttpRequest:
        given = [
            k
            for k in ("json", "form", "body")
            if k in self.model_fields_set or (k == "json" and "json_" in self.model_fields_set)
        ]
        if len(given) > 1:
            raise PydanticCustomError(
                "http_body",
                "an http step sends one body: choose one of json, form or body (found {found})",
                {"found": ", ".join(given), "at": given[-1]},
            )
        return self

    @property
    def has_json(self) -> bool:
        return "json_" in self.model_fields_set


class HttpStep(StepBase):
    http: HttpRequest
    outputs: dict[str, str] = {}

    @property
    def kind(self) -> str:
        return "http"


class SetStep(StepBase):
    set: dict[str, Any]

    @property
    def kind(self) -> str:
        return "set"


class ForEachStep(StepBase):
    for_each: str | list[Any]
    concurrency: int = Field(default=1, ge=1, le=100)
    steps: list[Step] = Field(min_length=1)

    @property
    def kind(self) -> str:
        return "for_each"

    def children(self) -> list[tuple[str, list[Step]]]:
        return [("steps", self.steps)]


class GroupStep(StepBase):
    group: list[Step] = Field(min_length=1)
    catch: list[Step] = []
    finally_: list[Step] = Field(default=[], alias="finally")

    @property
    def kind(self) -> str:
        return "group"

    def children(self) -> list[tuple[str, list[Step]]]:
        return [("group", self.group), ("catch", self.catch), ("finally", self.finally_)]


class SwitchStep(StepBase):
    switch: str
    cases: dict[str, list[Step]] = Field(min_length=1)
    default: list[Step] = []

    @field_validator("cases", mode="before")
    @classmethod
    def _string_keys(cls, value: Any) -> Any:
        # YAML reads `200:` or `true:` as numbers and booleans; cases compare as text.
        if isinstance(value, dict):
            return {
                (str(k).lower() if isinstance(k, bool) else str(k)): v for k, v in value.items()
            }
        return value

    @property
    def kind(self) -> str:
        return "switch"

    def children(self) -> list[tuple[str, list[Step]]]:
        return [(f"cases.{key}", steps) for key, steps in self.cases.items()] + [
            ("default", self.default)
        ]


class CallStep(StepBase):
    call: Name
    inputs: dict[str, Any] = {}

    @property
    def kind(self) -> str:
        return "call"


class WaitStep(StepBase):
    wait: Duration

    @property
    def kind(self) -> str:
        return "wait"


class LogStep(StepBase):
    log: str
    level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def kind(self) -> str:
        return "log"


class FailStep(StepBase):
    fail: str

    @property
    def kind(self) -> str:
        return "fail"


class Response(StrictModel):
    status: int = Field(default=200, ge=100, le=599)
    headers: dict[str, Any] = {}
    json_: Any = Field(default=None, alias="json")
    body: str | None = None

    @model_validator(mode="after")
    def _one_body(self) -> Response:
        if "json_" in self.model_fields_set and self.body is not None:
            raise PydanticCustomError(
                "respond_body", "respond with json or body, not both", {"at": "body"}
            )
        return self


class RespondStep(StepBase):
    respond: Response

    @property
    def kind(self) -> str:
        return "respond"


STEP_KINDS: dict[str, type[StepBase]] = {
    "http": HttpStep,
    "set": SetStep,
    "for_each": ForEachStep,
    "group": GroupStep,
    "switch": SwitchStep,
    "call": CallStep,
    "wait": WaitStep,
    "log": LogStep,
    "fail": FailStep,
    "respond": RespondStep,
}


def step_kinds_in(value: dict[Any, Any]) -> list[str]:
    return [kind for kind in STEP_KINDS if kind in value]


def _step_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = step_kinds_in(value)
        return f"{kinds[0]}-step" if len(kinds) == 1 else None
    if isinstance(value, StepBase):
        return f"{value.kind}-step"
    return None


Step = Annotated[
    Annotated[HttpStep, Tag("http-step")]
    | Annotated[SetStep, Tag("set-step")]
    | Annotated[ForEachStep, Tag("for_each-step")]
    | Annotated[GroupStep, Tag("group-step")]
    | Annotated[SwitchStep, Tag("switch-step")]
    | Annotated[CallStep, Tag("call-step")]
    | Annotated[WaitStep, Tag("wait-step")]
    | Annotated[LogStep, Tag("log-step")]
    | Annotated[FailStep, Tag("fail-step")]
    | Annotated[RespondStep, Tag("respond-step")],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message="a step needs exactly one kind",
    ),
]


class Flow(StrictModel):
    name: Name
    description: str = ""
    triggers: list[Trigger] = []
    inputs: dict[str, InputSpec] = {}
    vars: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    concurrency: Concurrency = Concurrency()
    timeout: Duration | None = None
    # A run cut short by a crash or a restart is marked interrupted; `restart` runs it
    # again from the start (for flows whose steps are safe to repeat).
    on_interrupt: Literal["mark", "restart"] = "mark"
    steps: list[Step] = Field(min_length=1)

    @property
    def schedules(self) -> list[Schedule]:
        return [t.schedule for t in self.triggers if isinstance(t, ScheduleTrigger)]

    @property
    def webhooks(self) -> list[Webhook]:
        return [t.webhook for t in self.triggers if isinstance(t, WebhookTrigger)]


for _model in (ForEachStep, GroupStep, SwitchStep, Flow):
    _model.model_rebuild()
