"""Run ids: random version-4 UUIDs, written as uuid.UUID writes them."""

from __future__ import annotations

import uuid

from flowrunner.engine import new_run_id


def test_a_run_id_is_a_version_4_uuid_in_its_usual_text() -> None:
    for _ in range(2000):
        text = new_run_id()
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == text


def test_run_ids_do_not_repeat() -> None:
    assert len({new_run_id() for _ in range(20000)}) == 20000
