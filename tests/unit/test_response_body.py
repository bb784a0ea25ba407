"""How an http step reads a response body: JSON when the content type says so."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from flowrunner.steps.http import parse_body
from flowrunner.wire import WireRequest, WireResponse


def response(body: bytes, content_type: str) -> WireResponse:
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": content_type}))
    request = WireRequest("GET", URL("http://127.0.0.1/x"), CIMultiDict())
    return WireResponse(200, headers, body, None, request.url, request)


def test_json_is_parsed_whatever_the_letter_case_of_its_content_type() -> None:
    assert parse_body(response(b'{"id": 7, "tags": ["a"]}', "Application/JSON")) == {
        "id": 7,
        "tags": ["a"],
    }


def test_json_that_python_reads_but_strict_parsers_refuse_is_still_parsed() -> None:
    """NaN and integers beyond 64 bits are not strict JSON; APIs send them anyway."""
    assert parse_body(response(b'{"id": 123456789012345678901234567890}', "application/json")) == {
        "id": 123456789012345678901234567890
    }
    parsed = parse_body(response(b'{"ratio": NaN}', "application/json"))
    assert isinstance(parsed, dict) and parsed["ratio"] != parsed["ratio"]


def test_a_body_that_is_not_json_stays_text() -> None:
    assert parse_body(response(b"<html>oops</html>", "application/json")) == "<html>oops</html>"
    assert parse_body(response(b'{"id": 7}', "text/plain")) == '{"id": 7}'
    assert parse_body(response(b"  ", "application/json")) == "  "


def test_a_declared_charset_other_than_utf8_is_decoded_before_parsing() -> None:
    body = '{"name": "Müller"}'.encode("latin-1")
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
    request = WireRequest("GET", URL("http://127.0.0.1/x"), CIMultiDict())
    latin = WireResponse(200, headers, body, "iso-8859-1", request.url, request)
    assert parse_body(latin) == {"name": "Müller"}
    # Bytes that are not UTF-8 under no declared charset read as text with replacements.
    assert parse_body(response(body, "application/json")) == {"name": "M\ufffdller"}


def test_header_dict_lowers_names_and_joins_a_repeated_header() -> None:
    """What a step's result and the history show: one entry a name, in lower case; a
    header sent twice (Set-Cookie, Vary) with its values joined by ", "."""
    headers = CIMultiDict([("Content-Type", "text/plain"), ("Vary", "Accept"), ("vary", "Origin")])
    request = WireRequest("GET", URL("http://127.0.0.1/x"), CIMultiDict())
    answer = WireResponse(200, CIMultiDictProxy(headers), b"", None, request.url, request)
    assert answer.header_dict() == {"content-type": "text/plain", "vary": "Accept, Origin"}
    single = response(b"", "application/json")
    assert single.header_dict() == {"content-type": "application/json"}
