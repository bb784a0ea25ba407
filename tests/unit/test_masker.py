"""The masker hides every registered secret in whatever the history keeps."""

from __future__ import annotations

import base64

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
values = st.recursive(
    st.none() | st.integers() | texts | st.builds(lambda a, b: a + SECRET + b, texts, texts),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=12,
)


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

    assert not any(SECRET in s for s in strings(masker().mask_value(value)))
