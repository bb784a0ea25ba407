"""The model of ``flowrunner.yaml``: notification channels, reminder policy, server settings."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from flowrunner.model.base import Duration, StrictModel
from flowrunner.model.profiles import DEFAULT_REMINDERS


class EmailChannel(StrictModel):
    type: Literal["email"]
    to: list[str] = Field(min_length=1)
    sender: str = Field(alias="from")
    host: str
    port: int = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: str | None = None


class WebhookChannel(StrictModel):
    type: Literal["webhook"]
    url: str
    format: Literal["json", "slack", "teams"] = "json"
    headers: dict[str, str] = {}


class LogChannel(StrictModel):
    type: Literal["log"]


Channel = EmailChannel | WebhookChannel | LogChannel


class Reminders(StrictModel):
    remind_before: list[Duration] = list(DEFAULT_REMINDERS)
    check_every: Duration = timedelta(hours=1)
    failure_quiet_period: Duration = timedelta(hours=1)


class Server(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8800, ge=0, le=65535)
    admin_token: str | None = None
    max_runs_in_flight: int = Field(default=64, ge=1, le=10_000)


class History(StrictModel):
    # As long as Power Automate keeps run history; `null` keeps everything.
    keep: Duration | None = timedelta(days=30)

    @field_validator("keep")
    @classmethod
    def _positive(cls, keep: timedelta | None) -> timedelta | None:
        if keep is not None and keep <= timedelta(0):
            raise PydanticCustomError(
                "duration",
                "keep must be longer than zero",
                {"hint": "write e.g. 30d, or null to keep every run"},
            )
        return keep


class Settings(StrictModel):
    database_url: str | None = None
    channels: dict[str, Channel] = {"log": LogChannel(type="log")}
    default_notify: list[str] = ["log"]
    reminders: Reminders = Reminders()
    server: Server = Server()
    history: History = History()

    @model_validator(mode="after")
    def _known_channels(self) -> Settings:
        if "default_notify" not in self.model_fields_set and "channels" in self.model_fields_set:
            # Declared channels are where reminders and alerts go unless said otherwise.
            object.__setattr__(self, "default_notify", list(self.channels))
        unknown = [c for c in self.default_notify if c not in self.channels]
        if unknown:
            raise PydanticCustomError(
                "channel",
                "default_notify names unknown channel '{name}'",
                {"name": unknown[0], "hint": "declare it under channels:"},
            )
        return self
