"""``${{ expr }}`` expressions: parsed once, checked statically, evaluated in a sandbox.

A string value is a *template*: literal text with embedded expressions. A template
that is exactly one expression keeps the expression's native type (a list stays a
list); mixed text renders to a string.

Expressions are Jinja2 expressions evaluated by an immutable sandboxed environment
(no access to Python internals, no mutation, no imports). Plain references such as
``steps.assets.outputs.ids`` or ``trigger.headers['x-id']``, by far the most common,
skip Jinja entirely: they are read by a small path walker that is both faster to
load and faster to evaluate, with the same semantics on dicts and lists.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flowrunner.errors import ExpressionError
from flowrunner.secrets import current_masker

EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
# A `{{ x }}` without the `$`: almost always a forgotten dollar sign.
BARE_BRACES = re.compile(r"(?<!\$)\{\{.*?\}\}", re.DOTALL)

_PATH = re.compile(
    r"""^\s*(?P<root>[A-Za-z_]\w*)(?P<rest>(?:\s*\.\s*[A-Za-z_]\w*|\s*\[\s*(?:\d+|'[^'\\]*'|"[^"\\]*")\s*\])*)\s*$"""
)
_PATH_PART = re.compile(r"""\.\s*([A-Za-z_]\w*)|\[\s*(\d+|'[^'\\]*'|"[^"\\]*")\s*\]""")


@dataclass(frozen=True)
class Reference:
    """A name used by an expression and the constant path read from it: steps.x.outputs."""

    root: str
    path: tuple[str | int, ...]

    def __str__(self) -> str:
        return ".".join([self.root, *(str(p) for p in self.path)])


# ---------------------------------------------------------------- filters


def _jsonpath(value: Any, path: str) -> Any:
    from flowrunner.jsonpaths import compile_jsonpath

    return compile_jsonpath(path).values(value)


def _b64encode(value: Any) -> str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    encoded = base64.b64encode(text.encode()).decode("ascii")
    masker = current_masker.get()
    if masker is not None and masker.contains_secret(text):
        masker.add(encoded)  # a Basic header built from a password is a secret too
    return encoded


def _b64decode(value: str) -> str:
    return base64.b64decode(value).decode("utf-8", errors="replace")


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=str, ensure_ascii=False)


def _fromjson(value: str) -> Any:
    return json.loads(value)


def _datetime(value: Any, fmt: str | None = None) -> Any:
    """Parse text into a datetime (ISO 8601 or epoch seconds); with a format, format it."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        value = datetime.fromtimestamp(value, tz=UTC)
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    if not isinstance(value, datetime):
        raise ExpressionError(f"cannot read {value!r} as a date and time")
    return value.strftime(fmt) if fmt else value


def _now() -> datetime:
    return datetime.now(UTC)


@cache
def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters.update(
        jsonpath=_jsonpath,
        b64encode=_b64encode,
        b64decode=_b64decode,
        tojson=_tojson,
        fromjson=_fromjson,
        datetime=_datetime,
    )
    env.globals.update(now=_now, timedelta=timedelta)
    return env


# Names every expression may use without declaring them (Jinja globals and ours).
GLOBAL_NAMES = frozenset(
    {"now", "timedelta", "range", "dict", "true", "false", "none", "True", "False", "None"}
)


# ---------------------------------------------------------------- expressions


class Expression:
    """One ``${{ }}`` expression, parsed and ready to evaluate."""

    __slots__ = ("_evaluate", "references", "source")

    def __init__(self, source: str) -> None:
        self.source = source.strip()
        path = _parse_path(self.source)
        if path is not None:
            self.references: tuple[Reference, ...] = (path,)
            self._evaluate: Callable[[Mapping[str, Any]], Any] = _path_reader(path)
        else:
            env = environment()
            try:
                tree = env.parse("{{ " + self.source + " }}")
                compiled = env.compile_expression(self.source, undefined_to_none=False)
            except jinja2.TemplateSyntaxError as exc:
                reason = (exc.message or str(exc)).replace(
                    "'end of print statement'", "the end of the expression"
                )
                raise ExpressionSyntaxError(self.source, reason) from None
            self.references = tuple(_references(tree))
            self._evaluate = compiled

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        try:
            value = self._evaluate(context)
        except ExpressionError:
            raise
        except jinja2.UndefinedError as exc:
            raise ExpressionError(f"${{{{ {self.source} }}}}: {exc.message}") from None
        except Exception as exc:
            raise ExpressionError(
                f"${{{{ {self.source} }}}}: {type(exc).__name__}: {exc}"
            ) from None
        if isinstance(value, jinja2.Undefined):
            raise ExpressionError(f"${{{{ {self.source} }}}}: value is undefined")
        return value


class ExpressionSyntaxError(ExpressionError):
    """An expression does not parse."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"invalid expression ${{{{ {source} }}}}: {reason}")
        self.source = source
        self.reason = reason


def _parse_path(source: str) -> Reference | None:
    match = _PATH.match(source)
    if match is None:
        return None
    root = match["root"]
    if root in ("true", "false", "none", "True", "False", "None"):
        return None
    parts: list[str | int] = []
    for name, index in _PATH_PART.findall(match["rest"]):
        if name:
            parts.append(name)
        elif index.isdigit():
            parts.append(int(index))
        else:
            parts.append(index[1:-1])
    return Reference(root, tuple(parts))


def _path_reader(ref: Reference) -> Callable[[Mapping[str, Any]], Any]:
    root, path = ref.root, ref.path

    def read(context: Mapping[str, Any]) -> Any:
        if root not in context:
            raise ExpressionError(f"${{{{ {ref} }}}}: '{root}' is undefined")
        value = context[root]
        for depth, part in enumerate(path):
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                where = ".".join([root, *(str(p) for p in path[:depth])])
                raise ExpressionError(
                    f"${{{{ {ref} }}}}: {where} has no {part!r}"
                    + (f" (it is {_describe(value)})" if not isinstance(value, Mapping) else "")
                ) from None
        return value

    return read


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def _references(tree: nodes.Node) -> Iterator[Reference]:
    """Every name the expression reads, with the constant part of the path after it."""

    def chain(node: nodes.Node) -> tuple[nodes.Name, list[str | int]] | None:
        parts: list[str | int] = []
        while True:
            if isinstance(node, nodes.Getattr):
                parts.append(node.attr)
                node = node.node
            elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
                parts.append(node.arg.value)
                node = node.node
            elif isinstance(node, nodes.Name):
                return node, parts[::-1]
            else:
                return None

    def walk(node: nodes.Node) -> Iterator[Reference]:
        if isinstance(node, nodes.Getattr | nodes.Getitem | nodes.Name):
            found = chain(node)
            if found is not None:
                name, parts = found
                if name.ctx == "load":
                    yield Reference(name.name, tuple(parts))
                return
        for child in node.iter_child_nodes():
            yield from walk(child)

    return walk(tree)


# ---------------------------------------------------------------- templates


class Template:
    """A string value compiled once: literal, one native-typed expression, or mixed text."""

    __slots__ = ("expressions", "parts", "single", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.parts: list[str | Expression] = []
        last = 0
        for match in EXPRESSION.finditer(source):
            if match.start() > last:
                self.parts.append(source[last : match.start()])
            self.parts.append(compile_expression(match[1]))
            last = match.end()
        if last < len(source):
            self.parts.append(source[last:])
        self.expressions = [p for p in self.parts if isinstance(p, Expression)]
        self.single = len(self.parts) == 1 and isinstance(self.parts[0], Expression)

    @property
    def is_literal(self) -> bool:
        return not self.expressions

    def render(self, context: Mapping[str, Any]) -> Any:
        if self.single:
            return self.parts[0].evaluate(context)  # type: ignore[union-attr]
        if not self.expressions:
            return self.source
        return "".join(
            part if isinstance(part, str) else to_text(part.evaluate(context))
            for part in self.parts
        )


def to_text(value: Any) -> str:
    """How a value reads inside mixed text: JSON for structures, lowercase booleans."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


_EXPRESSION_CACHE: dict[str, Expression] = {}
_TEMPLATE_CACHE: dict[str, Template] = {}


def compile_expression(source: str) -> Expression:
    """Parse an expression once; identical text across flows shares one compiled form."""
    key = source.strip()
    found = _EXPRESSION_CACHE.get(key)
    if found is None:
        found = _EXPRESSION_CACHE[key] = Expression(key)
    return found


def compile_template(source: str) -> Template:
    found = _TEMPLATE_CACHE.get(source)
    if found is None:
        found = _TEMPLATE_CACHE[source] = Template(source)
    return found


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """Render every template inside a YAML value (strings, lists, mappings)."""
    if isinstance(value, str):
        return compile_template(value).render(context) if "${{" in value else value
    if isinstance(value, dict):
        return {render(k, context): render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    return value


def condition_source(text: str) -> str:
    """``if:``, ``for_each:`` and ``switch:`` accept a bare expression as well as ``${{ }}``."""
    return text if "${{" in text else "${{ " + text + " }}"
