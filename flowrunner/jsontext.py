"""JSON text in and out: orjson where it gives what Python's json module gives, which is
several times faster on the paths every run takes (webhook bodies, response bodies, the
history's columns); Python's json for the rest.

orjson reads an integer beyond 64 bits as a float (an id would lose digits) and refuses
NaN and lone surrogates, which Python reads; it cannot write an integer beyond 64 bits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

# 19 digits in a row may be an integer beyond 64 bits: Python's reader keeps it exact.
# Found by mapping every digit to "0" and every other byte to "x", then looking for 19
# zeros: a fifth of what the regular expression \d{19} costs on every body read.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x78 for byte in range(256))
_NINETEEN_DIGITS = b"0" * 19
_COMPACT = (",", ":")  # as orjson writes
NOT_READ: Any = object()  # what loads_utf8 gives when it leaves the reading to loads


def loads(text: str) -> Any:
    """``json.loads(text)``: the same value, and for invalid JSON the same ValueError
    (its message says where the text went wrong)."""
    value = _read_with_orjson(text.encode("utf-8", "surrogatepass"))
    # Invalid, or only Python reads it: Python decides, and explains.
    return json.loads(text) if value is NOT_READ else value


def loads_utf8(content: bytes) -> Any:
    """``json.loads`` of UTF-8 bytes read straight by orjson, or ``NOT_READ`` when only
    :func:`loads` of the decoded text can say what they hold (invalid JSON or UTF-8, a
    long integer, NaN)."""
    return _read_with_orjson(content)


def _read_with_orjson(utf8: bytes) -> Any:
    """orjson's reading where it equals Python's, else NOT_READ (a lone surrogate, which
    ``surrogatepass`` made bytes that are not UTF-8, is left to Python too)."""
    # find, not `in`: `bytes in bytes` first tries the operand as an integer, and raises
    # and clears a TypeError on every call.
    if utf8.translate(_DIGITS_AS_ZEROS).find(_NINETEEN_DIGITS) < 0:
        try:
            return orjson.loads(utf8)
        except orjson.JSONDecodeError:
            pass
    return NOT_READ


def dumps_bytes(value: Any, default: Callable[[Any], Any] = str) -> bytes:
    """UTF-8 JSON of ``value`` (non-ASCII characters as they are, keys made text);
    ``default`` converts what JSON has no type for."""
    try:
        return dumps_with_orjson(value, default)
    except TypeError:  # an integer beyond 64 bits, a lone surrogate
        text = json.dumps(value, default=default, ensure_ascii=False, separators=_COMPACT)
        try:
            return text.encode()
        except UnicodeEncodeError:  # a lone surrogate: UTF-8 cannot carry it, \uXXXX can
            return json.dumps(value, default=default, separators=_COMPACT).encode()


def dumps_with_orjson(value: Any, default: Callable[[Any], Any] = str) -> bytes:
    """orjson's UTF-8 JSON, keys that are not text made text; TypeError for what orjson
    cannot write (an integer beyond 64 bits, a lone surrogate)."""
    try:
        return orjson.dumps(value, default=default)
    except TypeError:
        # A key that is not text (a number, a date): the option that writes such keys
        # makes every mapping slower (a third of a run's history columns), so only now.
        return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS)


def dumps(value: Any, default: Callable[[Any], Any] = str) -> str:
    return dumps_bytes(value, default).decode()
