"""YAML documents that remember where every value came from.

PyYAML's ``compose`` gives a node tree with marks; we build plain Python data from it
ourselves so that duplicate keys are errors (PyYAML keeps the last one silently) and
any path into the data, such as pydantic's ``loc``, maps back to ``file:line:col``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from flowrunner.errors import Position, Problem

# libyaml's parser when PyYAML has it: several times faster than the pure-Python one.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc]
    """libyaml's parser with a memo in front of PyYAML's tag resolver, which runs regexes
    in Python for every scalar although flow files repeat the same keys and values."""

    _resolved: dict[tuple[Any, ...], str] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is not yaml.ScalarNode or not isinstance(value, str) or implicit is None:
            return super().resolve(kind, value, implicit)
        key = (value, implicit[0], implicit[1])
        tag = self._resolved.get(key)
        if tag is None:
            tag = super().resolve(kind, value, implicit)
            if len(self._resolved) < 100_000:
                self._resolved[key] = tag
        return tag


_CONSTRUCTOR = yaml.constructor.SafeConstructor()
Loc = Sequence[str | int]


@dataclass
class SourceDocument:
    """A parsed YAML file: its data and its node tree, for positions."""

    file: str
    root: yaml.Node
    data: Any

    def node_at(self, loc: Loc, *, key: bool = False) -> yaml.Node:
        """The deepest node along ``loc``; elements that match nothing are skipped.

        pydantic inserts union tags into ``loc`` (``http-step``), which are not keys
        of the data, so skipping them lands on the right node.
        """
        node = self.root
        key_node: yaml.Node | None = None
        for part in loc:
            child, child_key = _child(node, part)
            if child is not None:
                node, key_node = child, child_key
        if key and key_node is not None:
            return key_node
        return node

    def position(self, loc: Loc = (), *, key: bool = False, offset: int | None = None) -> Position:
        node = self.node_at(loc, key=key)
        mark = node.start_mark
        column = mark.column + 1
        if offset is not None and isinstance(node, yaml.ScalarNode):
            # Offsets map onto columns only when the scalar sits on one line as written:
            # plain, or quoted without escapes (its width is then the text plus quotes).
            quotes = 2 if node.style in ('"', "'") else 0
            end = node.end_mark
            if (
                node.style in (None, "", '"', "'")
                and end.line == mark.line
                and end.column - mark.column == len(str(node.value)) + quotes
            ):
                column += offset + quotes // 2
        return Position(self.file, mark.line + 1, column)

    def value_at(self, loc: Loc) -> Any:
        value = self.data
        for part in loc:
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                continue
        return value


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node | None, yaml.Node | None]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and _scalar_key(key_node) == part:
                return value_node, key_node
            if isinstance(key_node, yaml.ScalarNode) and str(_scalar_key(key_node)) == str(part):
                return value_node, key_node
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        if 0 <= part < len(node.value):
            return node.value[part], None
    return None, None


def _scalar_key(node: yaml.ScalarNode) -> Any:
    if node.tag == "tag:yaml.org,2002:bool" and node.value.lower() not in ("true", "false"):
        return node.value  # as _Builder.scalar reads it: `on:` is a key, not True
    try:
        return _CONSTRUCTOR.construct_object(node, deep=True)
    except yaml.YAMLError:
        return node.value


class _Builder:
    """Turns a node tree into dicts, lists and scalars, collecting problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def position(self, node: yaml.Node) -> Position:
        return Position(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def build(self, node: yaml.Node, depth: int = 0) -> Any:
        if depth > 100:
            self.problems.append(Problem(self.position(node), "the document nests too deeply"))
            return None
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, depth + 1) for item in node.value]
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, depth)
        self.problems.append(Problem(self.position(node), "unsupported YAML node"))
        return None

    def scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag == "tag:yaml.org,2002:str":
            return node.value
        if node.tag == "tag:yaml.org,2002:bool" and node.value.lower() not in ("true", "false"):
            # YAML 1.2 booleans only: `on:`, `no` (Norway) and `yes` stay text.
            return node.value
        try:
            return _CONSTRUCTOR.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.problems.append(Problem(self.position(node), f"invalid value: {exc}"))
            return node.value

    def mapping(self, node: yaml.MappingNode, depth: int) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        seen: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merged = self.build(value_node, depth + 1)
                for source in merged if isinstance(merged, list) else [merged]:
                    if isinstance(source, dict):
                        for k, v in source.items():
                            result.setdefault(k, v)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(self.unhashable_key(key_node, node))
                continue
            key = self.scalar(key_node)
            if key in seen:
                first = seen[key]
                self.problems.append(
                    Problem(
                        self.position(key_node),
                        f"duplicate key '{key}' "
                        f"(first defined at line {first.start_mark.line + 1})",
                        "YAML keeps only the last one; remove or rename one of them",
                        code="duplicate_key",
                    )
                )
                continue
            seen[key] = key_node
            result[key] = self.build(value_node, depth + 1)
        return result

    def unhashable_key(self, key_node: yaml.Node, parent: yaml.Node) -> Problem:
        if isinstance(key_node, yaml.MappingNode):
            # `{{ x }}` is a mapping whose key is a mapping: point at the first brace.
            start = key_node.start_mark
            outer = parent.start_mark
            braces = outer.line == start.line and outer.column == start.column - 1
            return Problem(
                self.position(parent if braces else key_node),
                "'{{ ... }}' here is read by YAML as a mapping, not an expression",
                "write expressions as ${{ ... }}, e.g. url: ${{ vars.base }}/assets",
                code="bare_braces",
            )
        return Problem(self.position(key_node), "a mapping key must be a plain value")


def parse_yaml(text: str, file: str) -> tuple[SourceDocument | None, list[Problem]]:
    """Parse one YAML document; syntax errors come back as problems, never raised."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        return None, [_syntax_problem(exc, file, text)]
    except yaml.YAMLError as exc:
        return None, [Problem(Position(file, 1, 1), f"invalid YAML: {exc}", code="yaml")]
    if root is None:
        return None, [Problem(Position(file, 1, 1), "the file is empty", code="empty")]
    builder = _Builder(file)
    data = builder.build(root)
    return SourceDocument(file, root, data), builder.problems


def _syntax_problem(exc: yaml.MarkedYAMLError, file: str, text: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = (exc.problem or "invalid YAML").strip()
    hint = None
    lines = text.splitlines()
    source_line = lines[line - 1] if 0 < line <= len(lines) else ""
    if "\t" in problem or "'\\t'" in problem or "\t" in source_line[: max(column, 1)]:
        problem = "a tab character: YAML indents with spaces only"
        hint = "replace the tab with spaces"
        if "\t" in source_line:
            column = source_line.index("\t") + 1
    elif "expected a single document" in problem or "expected a single document" in str(
        exc.context
    ):
        problem = "one flow or profile per file: this file holds several YAML documents"
    elif "{{" in source_line and "${{" not in source_line:
        hint = "expressions are written ${{ ... }}"
    elif "mapping values are not allowed" in problem:
        hint = "a value that contains ': ' must be quoted, e.g. log: \"Site: ${{ inputs.site }}\""
    elif exc.context:
        context = exc.context.strip()
        started = exc.context_mark
        if started is not None and started.line + 1 != line:
            context += f" that starts at line {started.line + 1}, column {started.column + 1}"
        problem = f"{problem} ({context})"
    return Problem(Position(file, line, column), f"invalid YAML: {problem}", hint, code="yaml")
