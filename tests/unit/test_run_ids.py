"""Run ids: random version-4 UUIDs, written as uuid.UUID writes them."""

from __future__ import annotations

import os
import uuid
import warnings

from flowrunner.engine import new_run_id


def test_a_run_id_is_a_version_4_uuid_in_its_usual_text() -> None:
    for _ in range(2000):
        text = new_run_id()
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == text


def test_run_ids_do_not_repeat() -> None:
    assert len({new_run_id() for _ in range(20000)}) == 20000


def test_a_forked_child_does_not_hand_out_its_parents_ids() -> None:
    """Ids are read from the OS in batches; a child forked with a batch in hand starts a
    batch of its own, or parent and child would give the same run ids."""
    new_run_id()  # a batch in hand
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12 warns of a fork with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(new_run_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_run_id() for _ in range(5)}
    assert len(child) == 5
    assert not child & parent
