"""Live reload while ``flowrunner serve`` runs: a broken flow file keeps its previous
version and is reported; the other flows go on; a fixed file is swapped in.

The server runs in-process (``serving.ServerPool``) with a reload interval of 50 ms.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from serving import Served, ServeFactory, ServerPool

RELOAD_SECONDS = 0.05


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    """Start servers on project directories; all are stopped at teardown."""
    async with ServerPool() as pool:

        async def start(root: Path, **kwargs: Any) -> Served:
            return await pool.start(root, reload_seconds=RELOAD_SECONDS, **kwargs)

        yield start


def answering(name: str, version: int) -> str:
    return f"""
        name: {name}
        triggers:
          - webhook: {{path: {name}, auth: none, respond: wait}}
        steps:
          - id: reply
            respond: {{status: 200, json: {{flow: {name}, version: {version}}}}}
    """


TICKER = """
    name: ticker
    triggers:
      - schedule: {every: 1s, catch_up: none}
    steps:
      - id: note
        set: {at: "${{ trigger.fired_at }}"}
"""
BROKEN_YAML = "name: changing\nsteps: [\n"
BROKEN_STEP = """
    name: changing
    triggers:
      - webhook: {path: changing, auth: none, respond: wait}
    steps:
      - id: reply
        respnd: {status: 200}
"""


def write(root: Path, name: str, text: str) -> None:
    (root / "flows" / f"{name}.yaml").write_text(textwrap.dedent(text))


async def version_of(served: Served, name: str) -> Any:
    response = await served.client.post(f"/hooks/{name}", json={})
    return response.json().get("version") if response.status_code == 200 else response.status_code


@pytest.mark.parametrize("broken", [BROKEN_YAML, BROKEN_STEP], ids=["yaml", "model"])
async def test_a_broken_flow_keeps_its_previous_version_until_fixed(
    broken: str, make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """While a flow file is broken, its previous version keeps answering, the other flows and
    schedules go on, and /status and /healthz report the problem; fixing the file swaps the
    new version in."""
    root = make_project(
        {
            "steady": answering("steady", 1),
            "changing": answering("changing", 1),
            "ticker": TICKER,
        }
    )
    served = await serve(root)
    assert await version_of(served, "changing") == 1

    write(root, "changing", broken)
    broken_at = datetime.now(UTC)
    await served.until(lambda: served.server.problems != [], seconds=5)
    status = (await served.client.get("/status")).json()
    assert [p["file"] for p in status["problems"]] == ["flows/changing.yaml"]
    assert "changing" in status["flows"]
    assert (await served.client.get("/healthz")).json()["problems"] == 1
    assert await version_of(served, "changing") == 1
    assert await version_of(served, "steady") == 1

    def ticked_since_break() -> bool:
        return any(
            datetime.fromisoformat(r.trigger["fired_at"]) > broken_at for r in served.runs("ticker")
        )

    await served.until(ticked_since_break, seconds=5)

    write(root, "changing", answering("changing", 2))
    await served.until(lambda: served.server.problems == [], seconds=5)
    assert await version_of(served, "changing") == 2
    assert await version_of(served, "steady") == 1
    assert (await served.client.get("/status")).json()["problems"] == []


async def test_added_and_removed_flows_come_and_go(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """A new flow file is served after a reload; a deleted one stops answering (404)."""
    root = make_project({"steady": answering("steady", 1)})
    served = await serve(root)
    assert await version_of(served, "extra") == 404
    write(root, "extra", answering("extra", 1))
    await served.until(lambda: "extra" in served.server.project.flows, seconds=5)
    assert await version_of(served, "extra") == 1
    (root / "flows" / "extra.yaml").unlink()
    await served.until(lambda: "extra" not in served.server.project.flows, seconds=5)
    assert await version_of(served, "extra") == 404
    assert await version_of(served, "steady") == 1


async def test_a_reload_keeps_unchanged_schedules(
    make_project: Callable[..., Path], serve: ServeFactory
) -> None:
    """Reloading for an unrelated change leaves an unchanged schedule's job as it was; a
    changed schedule's job is replaced."""
    root = make_project({"ticker": TICKER.replace("1s", "1h"), "steady": answering("steady", 1)})
    served = await serve(root)

    def job() -> Any:
        return served.server.scheduler.job_of("ticker")

    before = job()
    write(root, "steady", answering("steady", 2))
    await answers(served, "steady", 2)
    assert job() is before
    write(root, "ticker", TICKER.replace("1s", "2h"))
    await served.until(lambda: job() is not before, seconds=5)
    assert job().trigger.interval.total_seconds() == 7200


async def answers(served: Served, name: str, version: int, seconds: float = 5) -> None:
    """Wait (bounded) until the flow's webhook answers with ``version``."""
    deadline = time.monotonic() + seconds
    while await version_of(served, name) != version:
        assert time.monotonic() < deadline, f"{name} never answered version {version}"
        await asyncio.sleep(RELOAD_SECONDS)
