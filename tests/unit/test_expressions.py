"""``${{ }}`` templates: native types, text rendering, filters, the sandbox and references."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowrunner.errors import ExpressionError
from flowrunner.expressions import (
    ExpressionSyntaxError,
    Reference,
    compile_expression,
    compile_template,
    compile_value,
    condition_source,
    render,
    to_text,
)

CONTEXT: dict[str, Any] = {
    "steps": {
        "assets": {
            "status": 200,
            "body": {"items": [{"id": 1}, {"id": 2}], "values": [4, 5], "next": None},
            "outputs": {"ids": [1, 2, 3], "count": 3, "first": {"id": 1, "tags": ["a"]}},
        }
    },
    "inputs": {"site": "HQ", "limit": 10, "flag": True, "nothing": None},
    "trigger": {"headers": {"x-id": "abc-123"}, "body": {"n": 2}},
    "vars": {"base": "https://api.example.com/v1"},
    "item": {"id": 7},
    "index": 0,
}


def r(text: str, context: dict[str, Any] | None = None) -> Any:
    return compile_template(text).render(CONTEXT if context is None else context)


# ---------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${{ steps.assets.outputs.ids }}", [1, 2, 3]),
        ("${{ steps.assets.outputs.count }}", 3),
        ("${{ steps.assets.outputs.first }}", {"id": 1, "tags": ["a"]}),
        ("${{ inputs.flag }}", True),
        ("${{ inputs.nothing }}", None),
        ("${{ steps.assets.outputs.ids | length }}", 3),
        ("${{ inputs.limit * 2 }}", 20),
    ],
)
def test_a_single_expression_keeps_its_native_type(text: str, expected: Any) -> None:
    """A value that is exactly one expression renders to the value itself, not its text."""
    value = r(text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Site ${{ inputs.site }}", "Site HQ"),
        ("${{ vars.base }}/assets", "https://api.example.com/v1/assets"),
        ("on=${{ inputs.flag }} off=${{ not inputs.flag }}", "on=true off=false"),
        ("first=${{ steps.assets.outputs.first }}", 'first={"id": 1, "tags": ["a"]}'),
        ("ids=${{ steps.assets.outputs.ids }}", "ids=[1, 2, 3]"),
        ("[${{ inputs.nothing }}]", "[]"),
        ("  ${{ inputs.limit * 2 }}  ", "  20  "),
        ("${{ inputs.limit }}${{ inputs.site }}", "10HQ"),
        ("no expression here", "no expression here"),
        ("", ""),
    ],
)
def test_mixed_text_renders_to_a_string(text: str, expected: str) -> None:
    """Mixed text is a string: lowercase booleans, JSON for structures, nothing for None."""
    assert r(text) == expected


def test_to_text_formats_dates_and_numbers() -> None:
    """Inside text, a datetime reads as ISO 8601 and numbers as Python writes them."""
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert to_text(moment) == "2026-01-02T03:04:05+00:00"
    assert to_text(2.5) == "2.5"
    assert to_text({"é": 1}) == '{"é": 1}'


@pytest.mark.parametrize(
    "path",
    [
        "steps.assets.outputs.ids",
        "steps.assets.outputs.first.tags[0]",
        "steps.assets.outputs.ids[2]",
        "steps.assets.body.items",
        "steps.assets.body['values']",
        "steps.assets.body.values",
        "trigger.headers['x-id']",
        'trigger.headers["x-id"]',
        "inputs.nothing",
        "item.id",
        "index",
    ],
)
def test_path_fast_path_and_jinja_agree(path: str) -> None:
    """A plain path (fast path) and the same path in parentheses (Jinja) give the same value."""
    fast = compile_expression(path).evaluate(CONTEXT)
    jinja = compile_expression(f"({path})").evaluate(CONTEXT)
    assert fast == jinja


def test_json_keys_win_over_dict_methods() -> None:
    """In Jinja expressions, ``body.items`` and ``body.values`` are the JSON keys, not methods."""
    assert r("${{ steps.assets.body.items | length }}") == 2
    assert r("${{ steps.assets.body.values | sum }}") == 9
    assert r("${{ steps.assets.body.items[1].id + 1 }}") == 3


@pytest.mark.parametrize(
    "path", ["steps.missing.outputs", "steps.assets.outputs.ids[9]", "inputs.site.x"]
)
def test_missing_data_fails_on_both_paths(path: str) -> None:
    """Reading what is not there raises ExpressionError on the fast path and in Jinja alike."""
    for source in (path, f"({path})"):
        with pytest.raises(ExpressionError):
            compile_expression(source).evaluate(CONTEXT)


# ---------------------------------------------------------------- filters


def test_filter_jsonpath() -> None:
    """``jsonpath`` returns every match of a multi-match path and the single match otherwise."""
    assert r("${{ steps.assets.body | jsonpath('$.items[*].id') }}") == [1, 2]
    assert r("${{ steps.assets.body | jsonpath('$.items[0].id') }}") == 1
    assert r("${{ steps.assets.body | jsonpath('$.nowhere') }}") is None


def test_filters_base64() -> None:
    """``b64encode`` and ``b64decode`` round-trip text, as a Basic credential needs."""
    assert r("${{ '0:secret' | b64encode }}") == base64.b64encode(b"0:secret").decode()
    assert r("${{ 'MDpzZWNyZXQ=' | b64decode }}") == "0:secret"
    assert r("${{ ('0:' ~ inputs.site) | b64encode | b64decode }}") == "0:HQ"


def test_filters_json() -> None:
    """``tojson`` writes JSON text (unicode kept) and ``fromjson`` reads it back."""
    assert r("${{ steps.assets.outputs.first | tojson }}") == '{"id": 1, "tags": ["a"]}'
    assert r("${{ 'é' | tojson }}") == '"é"'
    assert r("""${{ '{"a": [1, 2]}' | fromjson }}""") == {"a": [1, 2]}
    assert r("${{ (steps.assets.outputs.first | tojson | fromjson).tags }}") == ["a"]


def test_filter_datetime_parses_and_formats() -> None:
    """``datetime`` reads ISO 8601 (with Z) and epoch seconds; with a format it writes text."""
    parsed = r("${{ '2026-03-04T05:06:07Z' | datetime }}")
    assert parsed == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert r("${{ '2026-03-04T05:06:07Z' | datetime('%Y-%m-%d %H:%M') }}") == "2026-03-04 05:06"
    assert r("${{ 86400 | datetime('%Y-%m-%d') }}") == "1970-01-02"
    assert r("${{ (now() + timedelta(days=1)) > now() }}") is True
    with pytest.raises(ExpressionError, match="not-a-date"):
        r("${{ 'not-a-date' | datetime }}")


# ---------------------------------------------------------------- sandbox and errors


@pytest.mark.parametrize(
    "source",
    [
        "''.__class__",
        "''.__class__.__mro__",
        "inputs.limit.__class__.__mro__",
        "(inputs.limit).__class__.__mro__",
        "''.__class__.__mro__[1].__subclasses__()",
        "steps.__class__",
        "(steps).__class__",
        "now.__globals__",
        "inputs.update({'site': 'x'})",
    ],
)
def test_the_sandbox_refuses_python_internals(source: str) -> None:
    """Reaching Python internals or mutating data fails with ExpressionError, never an object."""
    with pytest.raises(ExpressionError) as caught:
        compile_template("${{ " + source + " }}").render(CONTEXT)
    assert source in str(caught.value)
    assert CONTEXT["inputs"]["site"] == "HQ"


@pytest.mark.parametrize("source", ["nobody", "nobody | length", "inputs.missing ~ 'x'"])
def test_an_undefined_name_raises_naming_the_expression(source: str) -> None:
    """An undefined name is an ExpressionError whose message quotes the expression."""
    with pytest.raises(ExpressionError) as caught:
        compile_template("Hello ${{ " + source + " }}").render(CONTEXT)
    assert f"${{{{ {source} }}}}" in str(caught.value)


@pytest.mark.parametrize(
    "text", ["${{ inputs.site | }}", "${{ }}", "${{ (inputs.site }}", "a ${{ inputs.site"]
)
def test_syntax_errors_raise_at_compile_time(text: str) -> None:
    """A template that does not parse raises ExpressionSyntaxError with a reason."""
    with pytest.raises(ExpressionSyntaxError) as caught:
        compile_template(text)
    assert caught.value.reason
    assert "end of print statement" not in caught.value.reason


def test_a_literal_dollar_braces_is_written_as_an_expression() -> None:
    """``${{ '${{' }}`` renders the two characters without starting an expression."""
    assert r("${{ '${{' }} x") == "${{ x"


def test_render_walks_nested_values() -> None:
    """``render`` renders every template in nested dicts and lists, keys included."""
    value = {
        "url": "${{ vars.base }}/sites/${{ inputs.site }}",
        "ids": "${{ steps.assets.outputs.ids }}",
        "${{ inputs.site }}": ["${{ index }}", {"n": "${{ trigger.body.n + 1 }}"}, 5, None],
        "plain": "text",
    }
    assert render(value, CONTEXT) == {
        "url": "https://api.example.com/v1/sites/HQ",
        "ids": [1, 2, 3],
        "HQ": [0, {"n": 3}, 5, None],
        "plain": "text",
    }


def test_condition_source_wraps_bare_conditions() -> None:
    """``if: x > 1`` is read as ``${{ x > 1 }}``; text with ``${{`` is kept as written."""
    assert condition_source("inputs.limit > 5") == "${{ inputs.limit > 5 }}"
    assert condition_source("${{ inputs.flag }}") == "${{ inputs.flag }}"
    assert r(condition_source("inputs.limit > 5")) is True


# ---------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("steps.a.outputs.ids | length", [Reference("steps", ("a", "outputs", "ids"))]),
        ("steps.a.outputs.ids", [Reference("steps", ("a", "outputs", "ids"))]),
        ("trigger.headers['x-id']", [Reference("trigger", ("headers", "x-id"))]),
        ("trigger.headers['x-id'] | lower", [Reference("trigger", ("headers", "x-id"))]),
        ("steps.a.body.items[0].id", [Reference("steps", ("a", "body", "items", 0, "id"))]),
        (
            "inputs.a if vars.b else item",
            [Reference("inputs", ("a",)), Reference("vars", ("b",)), Reference("item", ())],
        ),
        ("steps[inputs.which].status", [Reference("inputs", ("which",))]),
        ("'literal' ~ 3", []),
        ("true", []),
    ],
)
def test_references_are_extracted(source: str, expected: list[Reference]) -> None:
    """Each name an expression reads comes out with the constant path that follows it."""
    found = compile_expression(source).references
    assert {ref for ref in found if ref.root != "steps" or ref.path} == set(expected)


def test_reference_prints_as_a_dotted_path() -> None:
    """A Reference reads as the dotted path users write in messages."""
    assert str(Reference("steps", ("a", "outputs", "ids"))) == "steps.a.outputs.ids"


def test_identical_sources_share_one_compiled_form() -> None:
    """A template or expression compiled twice is the same object (compiled once)."""
    assert compile_template("${{ inputs.site }}") is compile_template("${{ inputs.site }}")
    assert compile_expression(" inputs.site ") is compile_expression("inputs.site")


# ---------------------------------------------------------------- compiled values

_CONTEXT = {
    "trigger": {"body": {"customer": 7, "tags": ["a", "b"]}},
    "steps": {"customer": {"body": {"id": "7", "email": "c@example.com"}}},
}
_TEXTS = st.sampled_from(
    [
        "plain",
        "${{ trigger.body.customer }}",
        "/customers/${{ trigger.body.customer }}",
        "${{ steps.customer.body.email }} and ${{ trigger.body.tags }}",
        "${{ trigger.body.tags | length }}",
    ]
)
_LEAVES = _TEXTS | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXTS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_VALUES)
def test_a_compiled_value_renders_as_render_does(value: Any) -> None:
    """An http step's URL, headers and body are compiled once: the same result as
    rendering the value, templated keys included."""
    assert compile_value(value)(_CONTEXT) == render(value, _CONTEXT)


def test_a_compiled_value_shares_what_holds_no_template() -> None:
    lines = [{"sku": "A-1", "qty": 2}]
    value = {"customer_id": "${{ steps.customer.body.id }}", "lines": lines}
    first, second = compile_value(value)(_CONTEXT), compile_value(value)(_CONTEXT)
    assert first == {"customer_id": "7", "lines": lines}
    assert first is not second and first["lines"] is lines  # a new dict; its static part as is
    assert compile_value(lines)(_CONTEXT) is lines


def test_a_compiled_value_raises_what_render_raises() -> None:
    value = {"id": "${{ steps.missing.body.id }}"}
    with pytest.raises(ExpressionError) as compiled:
        compile_value(value)(_CONTEXT)
    with pytest.raises(ExpressionError) as rendered:
        render(value, _CONTEXT)
    assert str(compiled.value) == str(rendered.value)
