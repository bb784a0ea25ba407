"""The masker hides every registered secret in whatever the history keeps."""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from flowrunner.secrets import MASK, Masker

SECRET = 'tok-"é\\n-42'  # a quote, a backslash and a non-ASCII letter: JSON escapes them


def masker() -> Masker:
    masker = Masker()
    masker.add(SECRET)
    return masker


def test_secrets_are_masked_in_nested_values_keys_included() -> None:
    value = {
        "headers": {"x-token": f"Bearer {SECRET}"},
        "items": [1, None, {"note": f"was {base64.b64encode(SECRET.encode()).decode()}"}],
        SECRET: ("kept", SECRET),
    }
    masked = masker().mask_value(value)
    assert masked == {
        "headers": {"x-token": f"Bearer {MASK}"},
        "items": [1, None, {"note": f"was {MASK}"}],
        MASK: ["kept", MASK],
    }
    assert value["headers"] == {"x-token": f"Bearer {SECRET}"}  # the original is untouched


def test_a_value_without_secrets_is_given_back_as_it_is() -> None:
    value = {"id": 7, "names": ["a", "b" * 40], "short": "tok"}
    assert masker().mask_value(value) is value


def test_text_shorter_than_any_secret_is_never_searched_wrongly() -> None:
    m = masker()
    assert m.mask("tok") == "tok"
    assert m.mask(f"x{SECRET}x") == f"x{MASK}x"


texts = st.text(
    alphabet=st.sampled_from(["a", '"', "\\", "é", "\n", "-", "4", "2", "t"]), max_size=6
)
with_secret = st.builds(lambda a, b: a + SECRET + b, texts, texts)
# A string that holds JSON text with the secret in it (an API echoing the request it got,
# a webhook carrying a JSON document as a string), escaped once or twice.
json_texts = st.builds(
    lambda text, ascii, twice: (
        json.dumps(json.dumps(text, ensure_ascii=ascii))
        if twice
        else json.dumps({"x": text}, ensure_ascii=ascii)
    ),
    with_secret,
    st.booleans(),
    st.booleans(),
)
values = st.recursive(
    st.none() | st.integers() | texts | with_secret | json_texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=12,
)


def masked_by_walking(masker: Masker, value: object) -> object:
    """What masking means: every string and every key masked, wherever it is."""
    if isinstance(value, str):
        return masker.mask(value)
    if isinstance(value, dict):
        return {masker.mask(str(k)): masked_by_walking(masker, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked_by_walking(masker, v) for v in value]
    return value


@settings(max_examples=300, deadline=None, database=None)
@given(value=values)
def test_no_string_left_holds_the_secret(value: object) -> None:
    def strings(v: object) -> list[str]:
        if isinstance(v, str):
            return [v]
        if isinstance(v, dict):
            return [s for k, x in v.items() for s in [str(k), *strings(x)]]
        if isinstance(v, list | tuple):
            return [s for x in v for s in strings(x)]
        return []

    masked = masker().mask_value(value)
    assert not any(SECRET in s for s in strings(masked))
    assert masked == masked_by_walking(masker(), value)
    excerpt, text = masker().mask_with_text(value)
    assert excerpt == masked
    assert json.loads(text) == json.loads(json.dumps(masked))


def test_a_secret_in_json_text_inside_a_string_is_masked() -> None:
    """An error body that quotes the request it got: the secret is there JSON-escaped
    (\\u00e9, \\"), inside a string that is itself written as JSON."""
    sent = json.dumps({"password": SECRET})
    assert masker().mask_value({"received": sent}) == {"received": json.dumps({"password": MASK})}
    _, text = masker().mask_with_text({"received": sent})
    assert SECRET not in text and json.dumps(SECRET)[1:-1] not in text


def test_values_that_are_not_json_as_they_are_are_still_masked() -> None:
    """A tuple as a key, a lone surrogate: the history still gets a masked value and text."""
    value = {("a", 1): f"x {SECRET}", "lone": "\ud83d"}
    masked, text = masker().mask_with_text(value)
    assert masked == {"('a', 1)": f"x {MASK}", "lone": "\ud83d"}
    assert SECRET not in text and json.loads(text) == masked
    assert masker().mask_value({"lone": f"\ud83d {SECRET}"}) == {"lone": f"\ud83d {MASK}"}
