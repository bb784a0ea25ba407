"""JSONPath over response bodies, each path compiled once (jsonpath-ng).

Most paths in flows are plain ones (``$.data[*].id``, ``$.items[0].name``): those are
also compiled into a short list of keys and indexes, and walked directly, which gives
jsonpath-ng's answer in a fraction of its time. Anything else (filters, slices, ``..``,
negative indexes) and any document the walk is unsure about goes to jsonpath-ng.
"""

from __future__ import annotations

import re
from typing import Any

from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext.parser import ExtendedJsonPathParser

# One parser for the process: building jsonpath-ng's parse tables costs more than parsing.
_PARSER = ExtendedJsonPathParser()

# One segment of a plain path: .name, ['name'], ["name"], [N] or [*].
_SEGMENT = re.compile(
    r"\.(?P<field>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\[(?:'(?P<single>[^'\\]*)'|\"(?P<double>[^\"\\]*)\"|(?P<index>\d+)|(?P<all>\*))\]"
)
_ALL = object()  # the [*] segment


class InvalidJsonPath(ValueError):
    """A JSONPath that does not parse."""


class _Unsure(Exception):
    """The direct walk met something only jsonpath-ng knows how to answer."""


def _plain_segments(source: str) -> tuple[str | int | object, ...] | None:
    """The keys, indexes and [*] of a plain path, or None when the path is not plain."""
    if not source.startswith("$"):
        return None
    segments: list[str | int | object] = []
    position = 1
    while position < len(source):
        found = _SEGMENT.match(source, position)
        if found is None:
            return None
        if found["field"] is not None:
            segments.append(found["field"])
        elif found["single"] is not None or found["double"] is not None:
            segments.append(found["single"] if found["single"] is not None else found["double"])
        elif found["index"] is not None:
            segments.append(int(found["index"]))
        else:
            segments.append(_ALL)
        position = found.end()
    return tuple(segments)


def _walk(document: Any, segments: tuple[str | int | object, ...]) -> list[Any]:
    """What jsonpath-ng finds for a plain path, as plain values."""
    current = [document]
    for segment in segments:
        found: list[Any] = []
        for value in current:
            if segment is _ALL:
                if isinstance(value, list):
                    found.extend(value)
                elif isinstance(value, dict):
                    found.extend(value.values())
                elif not isinstance(value, str | int | float | bool | None):
                    raise _Unsure
            elif isinstance(segment, str):
                if isinstance(value, dict):
                    if segment in value:
                        found.append(value[segment])
                elif not isinstance(value, list | str | int | float | bool | None):
                    raise _Unsure
            elif isinstance(segment, int):
                if isinstance(value, list):
                    if segment < len(value):
                        found.append(value[segment])
                elif not isinstance(value, dict | str | int | float | bool | None):
                    raise _Unsure
        current = found
    return current


class CompiledPath:
    __slots__ = ("_path", "_segments", "is_multiple", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._path = _PARSER.parse(source)
        except (JsonPathLexerError, JsonPathParserError, Exception) as exc:
            # jsonpath-ng raises bare Exceptions from its lexer for some inputs.
            raise InvalidJsonPath(f"invalid JSONPath {source!r}: {exc}") from None
        self._segments = _plain_segments(source)
        # Whether the path can match several values ([*], .., filters, slices).
        self.is_multiple = any(token in source for token in ("[*]", "..", "?(", ":", "*"))

    def find(self, document: Any) -> list[Any]:
        """Every match, in document order."""
        if self._segments is not None:
            try:
                return _walk(document, self._segments)
            except _Unsure:
                pass
        return [match.value for match in self._path.find(document)]

    def values(self, document: Any) -> Any:
        """All matches as a list for a multi-match path; the single match (or None) otherwise."""
        found = self.find(document)
        if self.is_multiple:
            return found
        return found[0] if found else None


_CACHE: dict[str, CompiledPath] = {}


def compile_jsonpath(source: str) -> CompiledPath:
    found = _CACHE.get(source)
    if found is None:
        found = _CACHE[source] = CompiledPath(source)
    return found
