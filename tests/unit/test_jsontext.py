"""flowrunner.jsontext reads and writes JSON exactly as Python's json module would."""

from __future__ import annotations

import json
import math

import pytest

from flowrunner import jsontext


@pytest.mark.parametrize(
    "text",
    [
        '{"id": 7, "name": "Ada", "tags": ["a", "b"], "price": 12.5, "ok": true, "none": null}',
        '{"id": 123456789012345678901234567890}',
        '{"id": -9223372036854775809}',
        '{"ratio": 0.1234567890123456789}',
        '"caf\\u00e9 \\ud83d\\ude00"',
        '{"a": 1, "a": 2}',
        "[]",
    ],
)
def test_loads_gives_what_json_gives(text: str) -> None:
    assert jsontext.loads(text) == json.loads(text)
    assert type(jsontext.loads(text)) is type(json.loads(text))


def test_loads_reads_what_only_python_reads() -> None:
    assert math.isnan(jsontext.loads('{"x": NaN}')["x"])
    assert jsontext.loads('"\\ud800"') == "\ud800"
    assert jsontext.loads('"\ud800 as it is"') == "\ud800 as it is"  # not even UTF-8


@pytest.mark.parametrize("text", ["{", '{"a": }', "", "nope"])
def test_invalid_json_raises_json_s_error_with_its_position(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        jsontext.loads(text)
    with pytest.raises(ValueError) as expected:
        json.loads(text)
    assert str(caught.value) == str(expected.value)


def test_dumps_keeps_big_integers_non_ascii_and_converts_the_rest() -> None:
    value = {"big": 2**70, "name": "café", 3: "three"}
    assert json.loads(jsontext.dumps(value)) == {"big": 2**70, "name": "café", "3": "three"}
    assert "café" in jsontext.dumps({"name": "café"})
    assert json.loads(jsontext.dumps({"when": object()}, default=lambda _: "x")) == {"when": "x"}


@pytest.mark.parametrize(
    "value",
    [
        {"a": {"b": [1, 2.5, None, True]}, "c": "text"},
        {1: "one", "nested": {2: ["two"], "x": {3.5: "y"}}},  # keys that are not text
        [{"z": 1}, {None: "none", True: "yes"}],
        {"when": object(), 4: object()},
    ],
)
def test_dumps_writes_any_key_as_json_does(value: object) -> None:
    """Keys that are not text are written as text wherever they sit, as json.dumps
    writes them: the same text whether or not a mapping holds such a key."""
    written = jsontext.dumps(value, default=lambda _: "x")
    assert written == json.dumps(value, default=lambda _: "x", separators=(",", ":"))


def test_dumps_writes_a_lone_surrogate_as_its_escape() -> None:
    """Text that went through a JSON reader may hold half a surrogate pair: it is kept as
    \\ud83d, so that a run holding it can still be recorded."""
    text = jsontext.dumps({"half": "x\ud83d", "name": "café"})
    assert json.loads(text) == {"half": "x\ud83d", "name": "café"}


@pytest.mark.parametrize(
    "content",
    [
        b'{"id": 7, "name": "Ada", "tags": ["a", "b"], "price": 12.5, "ok": true}',
        '{"name": "café", "emoji": "😀"}'.encode(),
        b'{"id": 123456789012345678901234567890}',
        b'{"x": NaN}',
        b'"\\ud800"',
        b"\xef\xbb\xbf{}",  # a byte order mark
        b'{"bad": "\xff"}',  # not UTF-8
        b"   ",
        b"{",
        b"",
    ],
)
def test_loads_utf8_gives_what_json_gives_or_leaves_it_to_loads(content: bytes) -> None:
    """Read from bytes, a value equals Python's reading of the decoded text; whatever orjson
    would read differently (long integers, NaN, lone surrogates) or not at all is left to
    loads, which the caller then asks."""
    read = jsontext.loads_utf8(content)
    if read is jsontext.NOT_READ:
        return
    expected = json.loads(content.decode("utf-8"))
    assert read == expected
    assert type(read) is type(expected)


def test_loads_utf8_reads_plain_json_itself() -> None:
    assert jsontext.loads_utf8(b'{"id": 7}') == {"id": 7}
    assert jsontext.loads_utf8(b'{"id": 1234567890123456789012}') is jsontext.NOT_READ
