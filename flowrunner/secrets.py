"""Secret values: where they come from, and how they are kept out of everything we write.

Values come from the environment first, then the project's ``.env``. Every value an
expression reads through ``secrets.NAME``, and every credential an auth profile applies,
is registered with the run's :class:`Masker`, which replaces it (and its base64 form)
wherever it appears in logs, run records and error messages.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import quote, quote_plus

from flowrunner import jsontext
from flowrunner.errors import ExpressionError

MASK = "***"
# Shorter values would mask ordinary words and numbers all over the history.
MIN_SECRET_LENGTH = 4


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=value`` lines; ``#`` comments, optional ``export`` and quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


@functools.lru_cache(maxsize=4096)
def encoded_forms(value: str) -> frozenset[str]:
    """A secret as it may appear in what we record. Cached: every run registers the same
    few credentials again, in its own masker."""
    forms = {value, base64.b64encode(value.encode()).decode("ascii")}
    forms.add(base64.urlsafe_b64encode(value.encode()).decode("ascii").rstrip("="))
    # How the value reads once encoded into a URL (query or path) or a JSON string.
    forms |= {quote(value, safe=""), quote_plus(value, safe=""), quote(value)}
    forms |= {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    return frozenset(forms)


@functools.lru_cache(maxsize=4096)
def _forms_and_shortest(value: str) -> tuple[frozenset[str], int]:
    forms = encoded_forms(value)
    return forms, min(len(form) for form in forms)


@functools.lru_cache(maxsize=256)
def _pattern_of(values: frozenset[str]) -> re.Pattern[str]:
    """One pattern for these forms, longest first. Cached: each run has its own masker,
    and most register the same credentials as the run before."""
    ordered = sorted(values, key=len, reverse=True)
    return re.compile("|".join(re.escape(v) for v in ordered))


@functools.lru_cache(maxsize=256)
def _json_pattern_of(values: frozenset[str]) -> re.Pattern[str]:
    """The forms as they read inside a JSON string: what a string that holds one of them
    shows in the JSON text of a whole value (each character escaped on its own, so an
    occurrence in the string is an occurrence in the text)."""
    return _pattern_of(frozenset(json.dumps(v, ensure_ascii=False)[1:-1] for v in values))


class Masker:
    """Replaces registered secret values in text, including inside longer strings."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._json_pattern: re.Pattern[str] | None = None
        self._shortest = 0  # text shorter than every form of every secret holds none

    def add(self, value: object) -> None:
        if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH or value in self._values:
            return
        forms, shortest = _forms_and_shortest(value)
        if not self._values:  # a run's first secret: most runs have one
            self._values = set(forms)
            self._shortest = shortest
            self._pattern = self._json_pattern = None
            return
        if not forms <= self._values:
            self._values |= forms
            self._shortest = min(self._shortest, shortest)
            self._pattern = self._json_pattern = None

    def __contains__(self, value: str) -> bool:
        return value in self._values

    def _compiled(self) -> re.Pattern[str]:
        if self._pattern is None:
            self._pattern = _pattern_of(frozenset(self._values))
        return self._pattern

    def mask(self, text: str) -> str:
        if not self._values or len(text) < self._shortest:
            return text
        return self._compiled().sub(MASK, text)

    def mask_value(self, value: object) -> object:
        """Mask every string inside a JSON-like value. A value that holds no secret is
        given back as it is, not copied."""
        if isinstance(value, str):
            return self.mask(value)
        if not self._values or not isinstance(value, dict | list | tuple):
            return value
        return self._masked(value)[0]

    def mask_with_text(self, value: object) -> tuple[object, str]:
        """The masked value and its JSON text."""
        if isinstance(value, str):
            masked_text = self.mask(value)
            return masked_text, jsontext.dumps(masked_text)
        masked, text = self._masked(value)
        return masked, text if text is not None else jsontext.dumps(masked)

    def _masked(self, value: object) -> tuple[object, str | None]:
        """The masked value, with its JSON text when it is the value as given. One search
        over that text tells whether a string in the value may hold a secret; only then is
        every string masked. A value orjson cannot write (a tuple as a key, a lone
        surrogate) is walked, which also makes its keys text."""
        text = _json_text(value)
        if text is None:
            return self._mask_walk(value), None
        if (
            not self._values
            or not isinstance(value, dict | list | tuple)
            or not self._may_hold_secret(text)
        ):
            return value, text
        return self._mask_walk(value), None

    def _may_hold_secret(self, json_text: str) -> bool:
        if self._json_pattern is None:
            self._json_pattern = _json_pattern_of(frozenset(self._values))
        return self._json_pattern.search(json_text) is not None

    def _mask_walk(self, value: object) -> object:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {self.mask(str(k)): self._mask_walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._mask_walk(v) for v in value]
        return value

    def contains_secret(self, text: str) -> bool:
        return bool(self._values) and self.mask(text) != text


def _json_text(value: object) -> str | None:
    """The value's JSON text as orjson writes it, non-ASCII characters as they are (the
    escapes the search for secrets expects; checked equal to ``json.dumps(...,
    ensure_ascii=False)``), or None when orjson cannot write it (a tuple as a key, a lone
    surrogate, an integer beyond 64 bits)."""
    try:
        return jsontext.dumps_with_orjson(value).decode()
    except (TypeError, ValueError):
        return None


# The masker of the run being executed, so that filters such as b64encode can register
# what they derive from a secret (a Basic header built from a password, say).
current_masker: contextvars.ContextVar[Masker | None] = contextvars.ContextVar(
    "current_masker", default=None
)


class MaskingFilter(logging.Filter):
    """Masks the running flow's secrets in log records: httpx logs every URL it requests,
    query-string API keys included, and exceptions may quote what they were given."""

    def filter(self, record: logging.LogRecord) -> bool:
        masker = current_masker.get()
        if masker is None:
            return True
        message = record.getMessage()
        masked = masker.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = masker.mask(logging.Formatter().formatException(record.exc_info))
        return True


class SecretStore:
    """The secrets available to a project: environment first, then ``.env``, then any
    fallback files (``flowrunner serve --sandbox`` adds ``.env.example``)."""

    def __init__(
        self,
        project_root: Path | None = None,
        environ: Mapping[str, str] | None = None,
        fallbacks: list[Path] | None = None,
    ):
        self._environ = os.environ if environ is None else environ
        self._files = [read_dotenv(project_root / ".env")] if project_root else []
        self._files += [read_dotenv(path) for path in fallbacks or []]

    def get(self, name: str) -> str | None:
        value = self._environ.get(name)
        for values in self._files:
            if value:
                break
            value = values.get(name) or value
        return value

    def view(self, masker: Masker) -> SecretsView:
        return SecretsView(self, masker)


class SecretsView(Mapping[str, str]):
    """What ``secrets.NAME`` reads in an expression; every value read gets masked."""

    def __init__(self, store: SecretStore, masker: Masker) -> None:
        self._store = store
        self._masker = masker

    def __getitem__(self, name: str) -> str:
        value = self._store.get(name)
        if value is None:
            raise ExpressionError(
                f"secret {name} is not set: export {name}=... or add it to the project's .env"
            )
        self._masker.add(value)
        return value

    def __getattr__(self, name: str) -> str:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0
