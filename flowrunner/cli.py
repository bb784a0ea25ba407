"""The ``flowrunner`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flowrunner.loader import find_project_root, load_project
from flowrunner.schema import SchemaKind, json_schema

app = typer.Typer(
    help="Run YAML flows of HTTP steps on schedules and webhooks, with credentials kept alive.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

ProjectOption = Annotated[
    Path | None,
    typer.Option(
        "--project", "-p", help="Project directory (default: found from the current one)."
    ),
]


def _project_root(project: Path | None) -> Path:
    return project.resolve() if project else find_project_root(Path.cwd())


@app.command()
def validate(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Files or directories (default: the project).")
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="text, or json for editors and CI.")
    ] = "text",
    project: ProjectOption = None,
) -> None:
    """Check flows and auth profiles; print every error as file:line:col."""
    if output_format not in ("text", "json"):
        raise typer.BadParameter("use text or json", param_hint="--format")
    for path in paths or []:
        if not path.exists():
            err.print(f"{path}: no such file or directory")
            raise typer.Exit(2)
    root = _project_root(
        project if project else (paths[0] if paths and paths[0].is_dir() else None)
    )
    loaded = load_project(root, paths or None)
    if output_format == "json":
        payload = {
            "valid": not loaded.problems,
            "flows": sorted(loaded.flows),
            "profiles": sorted(loaded.profiles),
            "errors": [p.as_dict() for p in loaded.problems],
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        for problem in loaded.problems:
            out.print(problem.format(), markup=False)
        if loaded.problems:
            err.print(f"{len(loaded.problems)} error(s)")
        else:
            err.print(f"ok: {len(loaded.flows)} flow(s), {len(loaded.profiles)} auth profile(s)")
    if loaded.problems:
        raise typer.Exit(1)


@app.command()
def schema(
    kind: Annotated[str, typer.Argument(help="flow, profile or settings.")] = "flow",
) -> None:
    """Print the JSON Schema of flows, auth profiles or settings."""
    if kind not in ("flow", "profile", "settings"):
        raise typer.BadParameter("use flow, profile or settings", param_hint="KIND")
    chosen: SchemaKind = kind  # type: ignore[assignment]
    sys.stdout.write(json.dumps(json_schema(chosen), indent=2) + "\n")


def main() -> None:
    app()
