"""The checkpoint process: it copies the log, at the lowest priority, and never outlives
the server that started it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowrunner.store.database import Database


def gone(pid: int, within: float = 10) -> bool:
    """Whether the process has exited (or is a zombie nobody reaped yet) within the time."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_it_copies_the_log_at_idle_priority_and_quits_with_the_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    database = Database.open(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:  # pages in the log, not copied yet
        conn.execute("CREATE TABLE filler (text TEXT)")
        conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 3000,) for _ in range(50)])
    database.checkpoint_in_background(every=0.02)
    process = database._checkpointer
    assert process is not None
    if hasattr(os, "SCHED_IDLE"):
        deadline = time.monotonic() + 10
        while os.sched_getscheduler(process.pid) != os.SCHED_IDLE:
            assert time.monotonic() < deadline, "never at idle priority"
            time.sleep(0.02)
    log = database.writes.inline.log
    assert log is not None
    deadline = time.monotonic() + 10
    while (frames := log.frames()) is None or frames[1] < frames[0]:
        assert time.monotonic() < deadline, f"the log was not copied: {frames}"
        time.sleep(0.02)
    database.close()
    assert process.poll() is not None  # it quit when told, and was waited for
    assert database.writes.inline.log is None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_it_quits_when_the_server_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no time to stop it: it quits when its standard input closes."""
    server = subprocess.Popen(  # noqa: S603 - this interpreter, fixed code
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from flowrunner.store.database import Database\n"
            f"database = Database.open('sqlite:///{tmp_path / 'state.db'}')\n"
            "database.checkpoint_in_background(every=0.05)\n"
            "print(database._checkpointer.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        checkpointer = int(server.stdout.readline())
        assert not gone(checkpointer, within=0.3)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert gone(checkpointer), "the checkpoint process outlived the server"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
