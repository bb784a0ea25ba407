"""A plain JSONPath is walked directly; whatever the document, the answer must be
jsonpath-ng's own (which the flows' outputs were written against)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonpath_ng.ext.parser import ExtendedJsonPathParser

from flowrunner.jsonpaths import InvalidJsonPath, compile_jsonpath

REFERENCE = ExtendedJsonPathParser()
KEYS = ["a", "b", "id", "data", "0", "x y"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False)
    | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=20,
)
segments = st.sampled_from(
    [".a", ".b", ".id", ".data", "[0]", "[1]", "[3]", "[*]", "['a']", '["id"]', "['x y']", "['0']"]
)
plain_paths = st.lists(segments, max_size=4).map(lambda parts: "$" + "".join(parts))


def reference(path: str, document: Any) -> list[Any]:
    return [match.value for match in REFERENCE.parse(path).find(document)]


@settings(max_examples=600, deadline=None, database=None)
@given(path=plain_paths, document=json_values)
def test_a_plain_path_finds_what_jsonpath_ng_finds(path: str, document: Any) -> None:
    assert compile_jsonpath(path).find(document) == reference(path, document)


@pytest.mark.parametrize(
    "path",
    [
        "$..id",
        "$.data[-1].id",
        "$.data[0:2]",
        "$.data[?(@.id > 1)].id",
        "$.data.*",
        "$.data[*].tags[*]",
        "$['data'][1]['id']",
    ],
)
def test_other_paths_give_jsonpath_ng_answers(path: str) -> None:
    document = {
        "data": [{"id": 1, "tags": ["x", "y"]}, {"id": 2, "tags": []}, {"id": 3}],
        "meta": {"id": 9},
    }
    assert compile_jsonpath(path).find(document) == reference(path, document)


def test_single_and_multiple_paths_answer_as_outputs_expect() -> None:
    document = {"data": [{"id": "a"}, {"id": "b"}], "total": 2}
    assert compile_jsonpath("$.total").values(document) == 2
    assert compile_jsonpath("$.missing").values(document) is None
    assert compile_jsonpath("$.data[*].id").values(document) == ["a", "b"]
    assert compile_jsonpath("$.data[5].id").values(document) is None
    assert compile_jsonpath("$.nothing[*]").values(document) == []


def test_an_invalid_path_is_refused_with_its_text() -> None:
    with pytest.raises(InvalidJsonPath, match=r"\$\.data\[\?"):
        compile_jsonpath("$.data[?")
