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
from jinja2.nodes import EvalContext
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


class _Environment(ImmutableSandboxedEnvironment):
    """Data before methods: ``body.items`` is the JSON key 'items', as on the path fast path,
    not ``dict.items``."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


@cache
def environment() -> ImmutableSandboxedEnvironment:
    env = _Environment(undefined=jinja2.StrictUndefined, autoescape=False)
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
    """One ``${{ }}`` expression, parsed and ready to evaluate.

    Three tiers, cheapest first: a plain path (``steps.a.outputs.ids``), a path through
    filters with literal arguments (``... | first | default('none')``), both evaluated
    without Jinja; anything else is parsed by Jinja at load time (syntax, names and
    filters checked) and compiled to Python on its first evaluation.
    """

    __slots__ = ("_compiled", "_evaluate", "references", "source")

    def __init__(self, source: str) -> None:
        self.source = source.strip()
        self._compiled: Callable[[Mapping[str, Any]], Any] | None = None
        fast = _parse_filtered_path(self.source)
        if fast is not None:
            path, filters = fast
            self.references: tuple[Reference, ...] = (path,)
            self._evaluate: Callable[[Mapping[str, Any]], Any] = (
                _path_reader(path) if not filters else _filtered_reader(path, filters)
            )
            return
        self.references = _jinja_references(self.source)
        self._evaluate = self._evaluate_with_jinja

    def _evaluate_with_jinja(self, context: Mapping[str, Any]) -> Any:
        if self._compiled is None:
            self._compiled = environment().compile_expression(self.source, undefined_to_none=False)
        return self._compiled(context)

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        try:
            value = self._evaluate(context)
        except _Missing as exc:  # quote the whole expression, filters included
            raise ExpressionError(f"${{{{ {self.source} }}}}: {exc.detail}") from None
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


# Step ids vary from flow to flow while the shape of expressions repeats; Jinja parses
# each shape once, with step ids replaced by placeholders that are mapped back after.
_STEP_ID = re.compile(r"\bsteps\s*\.\s*([A-Za-z_]\w*)")
_PLACEHOLDER = re.compile(r"^__s(\d+)__$")
_SHAPES: dict[str, tuple[Reference, ...] | ExpressionSyntaxError] = {}


def _jinja_references(source: str) -> tuple[Reference, ...]:
    ids: list[str] = []

    def hide(match: re.Match[str]) -> str:
        ids.append(match[1])
        return f"steps.__s{len(ids) - 1}__"

    shape = _STEP_ID.sub(hide, source)
    found = _SHAPES.get(shape)
    if found is None:
        found = _SHAPES[shape] = _parse_shape(shape)
    if isinstance(found, ExpressionSyntaxError):
        raise ExpressionSyntaxError(source, found.reason)
    return tuple(_unhide(ref, ids) for ref in found)


def _unhide(ref: Reference, ids: list[str]) -> Reference:
    if ref.root != "steps" or not ref.path or not isinstance(ref.path[0], str):
        return ref
    match = _PLACEHOLDER.match(ref.path[0])
    if match is None:
        return ref
    return Reference(ref.root, (ids[int(match[1])], *ref.path[1:]))


def _parse_shape(shape: str) -> tuple[Reference, ...] | ExpressionSyntaxError:
    env = environment()
    try:
        tree = env.parse("{{ " + shape + " }}")
    except jinja2.TemplateSyntaxError as exc:
        reason = (exc.message or str(exc)).replace(
            "'end of print statement'", "the end of the expression"
        )
        return ExpressionSyntaxError(shape, reason)
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        known = env.filters if isinstance(node, nodes.Filter) else env.tests
        if node.name not in known:
            what = "filter" if isinstance(node, nodes.Filter) else "test"
            return ExpressionSyntaxError(shape, f"no {what} named '{node.name}'")
    return tuple(_references(tree))


_FILTER = re.compile(
    r"""\|\s*(?P<name>[A-Za-z_]\w*)\s*(?:\((?P<args>(?:\s*(?:'[^'\\]*'|"[^"\\]*"|-?\d+(?:\.\d+)?|"""
    r"""true|false|none|True|False|None)\s*,?)*)\))?\s*"""
)
_ARG = re.compile(r"""'[^'\\]*'|"[^"\\]*"|-?\d+(?:\.\d+)?|true|false|none|True|False|None""")
_LITERALS = {"true": True, "false": False, "none": None, "True": True, "False": False, "None": None}
Filter = tuple[str, tuple[Any, ...]]


def _parse_filtered_path(source: str) -> tuple[Reference, tuple[Filter, ...]] | None:
    head, bar, _ = source.partition("|")
    path = _parse_path(head)
    if path is None:
        return None
    if not bar:
        return path, ()
    rest = source[len(head) :]
    filters: list[Filter] = []
    position = 0
    env = environment()
    while position < len(rest):
        match = _FILTER.match(rest, position)
        if match is None or match.end() == position:
            return None
        name = match["name"]
        function = env.filters.get(name)
        if function is None or _pass_arg(function) == "context":
            return None  # Jinja reports unknown filters; context filters need Jinja
        args = tuple(_literal(a) for a in _ARG.findall(match["args"] or ""))
        filters.append((name, args))
        position = match.end()
    return path, tuple(filters)


def _literal(text: str) -> Any:
    if text in _LITERALS:
        return _LITERALS[text]
    if text[0] in "'\"":
        return text[1:-1]
    return float(text) if "." in text else int(text)


def _pass_arg(function: Callable[..., Any]) -> str | None:
    marker = getattr(function, "jinja_pass_arg", None)
    return getattr(marker, "name", None)


def _filtered_reader(
    ref: Reference, filters: tuple[Filter, ...]
) -> Callable[[Mapping[str, Any]], Any]:
    read = _path_reader(ref)
    env = environment()
    steps: list[tuple[Callable[..., Any], str | None, tuple[Any, ...]]] = [
        (env.filters[name], _pass_arg(env.filters[name]), args) for name, args in filters
    ]
    first_is_default = filters[0][0] in ("default", "d")

    def evaluate(context: Mapping[str, Any]) -> Any:
        chain = steps
        try:
            value = read(context)
        except ExpressionError:
            if not first_is_default:
                raise
            # `missing | default(x)`: Jinja's default replaces what is undefined.
            value = steps[0][2][0] if steps[0][2] else ""
            chain = steps[1:]
        for function, passes, args in chain:
            if passes == "environment":
                value = function(env, value, *args)
            elif passes == "eval_context":
                value = function(EvalContext(env), value, *args)
            else:
                value = function(value, *args)
        return value

    return evaluate


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


class _Missing(ExpressionError):
    """A path reads what is not there; Expression.evaluate names the expression."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _path_reader(ref: Reference) -> Callable[[Mapping[str, Any]], Any]:
    root, path = ref.root, ref.path

    def read(context: Mapping[str, Any]) -> Any:
        if root not in context:
            raise _Missing(f"'{root}' is undefined")
        value = context[root]
        for depth, part in enumerate(path):
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                where = ".".join([root, *(str(p) for p in path[:depth])])
                raise _Missing(
                    f"{where} has no {part!r}"
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
        for part in self.parts:
            if isinstance(part, str) and "${{" in part:
                # Not a literal: a forgotten '}}' would otherwise send '${{ x' as it is.
                unclosed = part[part.index("${{") :]
                raise ExpressionSyntaxError(unclosed, "'${{' is not closed with '}}'")
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


# json.dumps(value, default=str, ensure_ascii=False), with one encoder for the process.
_JSON_TEXT = json.JSONEncoder(default=str, ensure_ascii=False)


def to_text(value: Any) -> str:
    """How a value reads inside mixed text: JSON for structures, lowercase booleans."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return _JSON_TEXT.encode(value)
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


Renderer = Callable[[Mapping[str, Any]], Any]


def compile_value(value: Any) -> Renderer:
    """``render(value, context)`` as a function of the context, worked out once for a
    value rendered run after run (an http step's URL, headers and body): its templates
    compiled, and its parts that hold none not walked again. Those parts are given as
    they are, not copied: a rendered value is read, never changed."""
    renderer = _renderer(value)
    if renderer is not None:
        return renderer

    def constant(context: Mapping[str, Any]) -> Any:
        return value

    return constant


def _renderer(value: Any) -> Renderer | None:
    """The renderer of a value, or None when nothing in it is a template."""
    if isinstance(value, str):
        return compile_template(value).render if "${{" in value else None
    if isinstance(value, dict):
        if any(isinstance(key, str) and "${{" in key for key in value):
            return lambda context: render(value, context)  # a templated key: rare
        items = [(key, item, _renderer(item)) for key, item in value.items()]
        if all(renderer is None for _, _, renderer in items):
            return None

        def render_dict(context: Mapping[str, Any]) -> dict[Any, Any]:
            return {k: v if r is None else r(context) for k, v, r in items}

        return render_dict
    if isinstance(value, list):
        parts = [(item, _renderer(item)) for item in value]
        if all(renderer is None for _, renderer in parts):
            return None

        def render_list(context: Mapping[str, Any]) -> list[Any]:
            return [v if r is None else r(context) for v, r in parts]

        return render_list
    return None


def condition_source(text: str) -> str:
    """``if:``, ``for_each:`` and ``switch:`` accept a bare expression as well as ``${{ }}``."""
    return text if "${{" in text else "${{ " + text + " }}"
