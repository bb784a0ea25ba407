"""Building blocks shared by every model: strict frozen models and the value types of YAML."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any, Generic, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from flowrunner.durations import DURATION_HINT, parse_duration


def closest(word: str, choices: list[str] | set[str] | tuple[str, ...]) -> str | None:
    """The likeliest intended spelling of ``word``, for "did you mean" hints."""
    matches = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


_KNOWN_KEYS: dict[type[BaseModel], frozenset[str]] = {}

M = TypeVar("M")
T = TypeVar("T")


class PerModel(Generic[M, T]):
    """What ``make`` derives from a (frozen) model, made once per model object: the
    paths every run takes read plain objects. A pydantic model answers each attribute
    through its ``__getattr__`` hook, several times slower than a plain object.

    Kept by the model's identity; each entry holds its model, so the identity is not
    reused while it is kept. Bounded: a reload makes new models, and the old go."""

    def __init__(self, make: Callable[[M], T], kept: int = 4096) -> None:
        self._make = make
        self._kept = kept
        self._made: dict[int, tuple[M, T]] = {}

    def __call__(self, model: M) -> T:
        held = self._made.get(id(model))
        if held is None:
            if len(self._made) >= self._kept:
                self._made.clear()
            held = self._made[id(model)] = (model, self._make(model))
        return held[1]


class StrictModel(BaseModel):
    """Frozen, and an unknown key is an error that names the closest known key."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @classmethod
    def known_keys(cls) -> frozenset[str]:
        keys = _KNOWN_KEYS.get(cls)
        if keys is None:
            keys = frozenset(info.alias or name for name, info in cls.model_fields.items())
            _KNOWN_KEYS[cls] = keys
        return keys

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = cls.known_keys()
            unknown = [key for key in data if key not in known]
            if unknown:
                key = unknown[0]
                suggestion = closest(str(key), list(known))
                raise PydanticCustomError(
                    "unknown_key",
                    "unknown key '{key}'",
                    {
                        "key": key,
                        "suggestion": suggestion or "",
                        "known": ", ".join(sorted(known)),
                    },
                )
        return data


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise PydanticCustomError(
            "duration", "expected a duration such as 30s or 15m", {"hint": DURATION_HINT}
        )
    try:
        return parse_duration(value)
    except ValueError as exc:
        error = str(exc) if not isinstance(value, float) else f"{value!r} is not a duration"
        raise PydanticCustomError(
            "duration", "{error}", {"error": error, "hint": DURATION_HINT}
        ) from exc
    except OverflowError as exc:  # .inf, 1e400, 99999999999999d: beyond what timedelta holds
        raise PydanticCustomError(
            "duration",
            "{value} is too long for a duration",
            {"value": value, "hint": DURATION_HINT},
        ) from exc


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^\s*(\d+(\.\d+)?\s*(ms|s|m|h|d|w)\s*)+$",
            "examples": ["30s", "15m", "2h", "14d"],
        }
    ),
]

# Step ids are used as `steps.<id>` in expressions, so they must be valid identifiers.
StepId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# Flow and profile names appear in URLs and CLI arguments.
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=100)]

_STATUS_CLASS = re.compile(r"^[1-5]xx$")


def _status_pattern(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit() and 100 <= int(text) <= 599:
            return int(text)
        if _STATUS_CLASS.match(text):
            return text
    raise PydanticCustomError(
        "status",
        "expected an HTTP status (200) or a class of statuses (2xx), got {value}",
        {"value": value, "hint": "expect: [200, 201] or expect: [2xx]"},
    )


StatusPattern = Annotated[
    int | str,
    BeforeValidator(_status_pattern),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 599}, {"pattern": "^[1-5]xx$"}]}
    ),
]


def status_matches(status: int, patterns: list[int | str] | tuple[int | str, ...]) -> bool:
    for pattern in patterns:
        if isinstance(pattern, int):
            if status == pattern:
                return True
        elif str(status)[0] == pattern[0]:
            return True
    return False
