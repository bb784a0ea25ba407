"""JSONPath over response bodies, each path compiled once (jsonpath-ng)."""

from __future__ import annotations

from typing import Any

from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext.parser import ExtendedJsonPathParser

# One parser for the process: building jsonpath-ng's parse tables costs more than parsing.
_PARSER = ExtendedJsonPathParser()


class InvalidJsonPath(ValueError):
    """A JSONPath that does not parse."""


class CompiledPath:
    __slots__ = ("_path", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._path = _PARSER.parse(source)
        except (JsonPathLexerError, JsonPathParserError, Exception) as exc:
            # jsonpath-ng raises bare Exceptions from its lexer for some inputs.
            raise InvalidJsonPath(f"invalid JSONPath {source!r}: {exc}") from None

    @property
    def is_multiple(self) -> bool:
        """Whether the path can match several values ([*], .., filters, slices)."""
        return any(token in self.source for token in ("[*]", "..", "?(", ":", "*"))

    def values(self, document: Any) -> Any:
        """All matches as a list for a multi-match path; the single match (or None) otherwise."""
        found = [match.value for match in self._path.find(document)]
        if self.is_multiple:
            return found
        return found[0] if found else None


_CACHE: dict[str, CompiledPath] = {}


def compile_jsonpath(source: str) -> CompiledPath:
    found = _CACHE.get(source)
    if found is None:
        found = _CACHE[source] = CompiledPath(source)
    return found
