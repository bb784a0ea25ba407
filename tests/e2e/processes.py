"""Real ``flowrunner`` processes for end-to-end tests, started the way a user starts them.

``Background`` is a long-running command (``serve``, ``sandbox``) whose output goes to a
log file and which is stopped with SIGTERM, then killed; ``flowrunner`` runs a one-shot
command to completion. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

# Importing flowrunner takes seconds on a loaded machine; a cold bytecode cache more.
START_SECONDS = 40.0
COMMAND_SECONDS = 60.0
STOP_SECONDS = 15.0


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a dotenv file, as ``set -a; . FILE`` would export them."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def process_env(extra: Mapping[str, str], pycache: Path | None = None) -> dict[str, str]:
    """The test's environment plus ``extra``, with wide uncoloured output; bytecode goes to
    ``pycache`` (outside the repository) so that each process does not recompile."""
    env = {**os.environ, "COLUMNS": "240", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"}
    env.update(extra)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def flowrunner(
    *args: str,
    cwd: Path,
    env: Mapping[str, str],
    stdin: str | None = None,
    timeout: float = COMMAND_SECONDS,
) -> subprocess.CompletedProcess[str]:
    """``python -m flowrunner ARGS`` to completion (bounded), its output captured."""
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "flowrunner", *args],
        cwd=cwd,
        env=dict(env),
        input=stdin if stdin is not None else "",
        capture_output=True,
        encoding="utf-8",
        timeout=timeout,
        check=False,
    )


class Background:
    """A long-running ``python -m flowrunner ARGS`` process; stdout and stderr go to ``log``."""

    def __init__(self, args: list[str], cwd: Path, env: Mapping[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._out = log.open("ab")
        try:
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                [sys.executable, "-m", "flowrunner", *args],
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            self._out.close()
            raise

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, url: str, seconds: float = START_SECONDS) -> None:
        """Poll ``url`` until it answers 200; fail with the log if the process dies or the
        deadline passes."""
        deadline = time.monotonic() + seconds
        with httpx.Client(timeout=2, trust_env=False) as client:
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"flowrunner {' '.join(self.args)} exited with "
                        f"{self.process.returncode}:\n{self.output()}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"flowrunner {' '.join(self.args)} did not answer {url} within "
                        f"{seconds:.0f} s:\n{self.output()}"
                    )
                time.sleep(0.1)

    def stop(self, seconds: float = STOP_SECONDS) -> int:
        """SIGTERM, then SIGKILL if it is still running after ``seconds``; the exit status."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=seconds)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            return self.process.wait(timeout=seconds)
        finally:
            self._out.close()
