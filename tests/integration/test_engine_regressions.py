"""Behaviours found wanting in use: dates in outputs, bare for_each expressions, header
letter case, where a relative database path points, and where alerts go by default."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from flowrunner.app import Runtime
from flowrunner.model import Settings

ProjectWriter = Callable[..., Path]
RuntimeFactory = Callable[..., Runtime]


async def test_a_date_in_outputs_is_stored_as_iso_text(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A run whose outputs hold a datetime finishes and its history keeps the date as text."""
    root = write_project(
        {
            "main": """
        name: main
        outputs: {at: "${{ steps.t.outputs.when }}"}
        steps:
          - id: t
            set: {when: "${{ now() }}"}
        """
        }
    )
    runtime = open_runtime(root)
    record = await runtime.engine.run("main")
    assert record.status == "succeeded"
    stored = runtime.history.get_run(record.id)
    assert stored is not None and stored.status == "succeeded"
    assert isinstance(stored.outputs["at"], str) and stored.outputs["at"][:2] == "20"


async def test_a_bare_for_each_is_an_expression(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """`for_each: steps.x.outputs.ids` iterates the list, as `if:` reads a bare condition."""
    root = write_project(
        {
            "main": """
        name: main
        steps:
          - id: t
            set: {ids: [3, 1, 2]}
          - id: each
            for_each: steps.t.outputs.ids
            steps:
              - id: double
                set: {value: "${{ item * 2 }}"}
        """
        }
    )
    record = await open_runtime(root).engine.run("main")
    assert record.status == "succeeded", record.error
    each = next(s for s in record.steps if s.path == "each")
    assert [r["double"]["outputs"]["value"] for r in each.outputs] == [6, 2, 4]


async def test_a_content_type_written_in_lowercase_is_sent_once(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A flow's own `content-type` header replaces the default instead of doubling it."""
    seen: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get_list("content-type"))
        return httpx.Response(200, json={})

    root = write_project(
        {
            "main": """
        name: main
        steps:
          - id: post
            http:
              method: POST
              url: http://api.example/items
              headers: {content-type: application/vnd.api+json}
              json: {a: 1}
        """
        }
    )
    runtime = open_runtime(root, transport=httpx.MockTransport(handler))
    record = await runtime.engine.run("main")
    assert record.status == "succeeded", record.error
    assert seen == [["application/vnd.api+json"]]


async def test_a_relative_sqlite_path_belongs_to_the_project(
    make_project: Callable[..., Path], open_runtime: RuntimeFactory
) -> None:
    """`database_url: sqlite:///state/runs.db` lands in the project, wherever the command runs."""
    root = make_project(
        {"main": "name: main\nsteps:\n  - id: hi\n    log: hi\n"},
        settings="database_url: sqlite:///state/runs.db\n",
    )
    runtime = open_runtime(root)
    record = await runtime.engine.run("main")
    assert record.status == "succeeded"
    assert (root / "state" / "runs.db").is_file()


def test_declared_channels_are_the_default_destination() -> None:
    """Declaring channels without default_notify sends reminders and alerts to all of them."""
    settings = Settings.model_validate(
        {"channels": {"ops-mail": {"type": "log"}, "teams": {"type": "log"}}}
    )
    assert settings.default_notify == ["ops-mail", "teams"]
    explicit = Settings.model_validate(
        {"channels": {"ops-mail": {"type": "log"}}, "default_notify": []}
    )
    assert explicit.default_notify == []


async def test_a_connected_user_token_expression_reads_the_trigger(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A connected-user profile's `token:` expression picks the user's token from the trigger."""
    root = write_project(
        {
            "main": """
        name: main
        outputs: {seen: "${{ steps.call.body.headers.authorization }}"}
        steps:
          - id: call
            http: {url: /echo, auth: me}
        """
        },
        {
            "me": """
        name: me
        kind: connected_user
        token: ${{ trigger.headers['x-user-token'] }}
        base_url: @BASE@
        """
        },
    )
    runtime = open_runtime(root)
    record = await runtime.engine.run("main", trigger={"headers": {"x-user-token": "tok-alice-42"}})
    assert record.status == "succeeded", record.error
    assert runtime.history.get_run(record.id) is not None
    # The upstream saw the token; the run's own record keeps it masked.
    assert record.outputs == {"seen": "Bearer ***"}
    without = await runtime.engine.run("main", trigger={"headers": {}})
    assert without.status == "failed" and "no user token" in (without.error or "")
