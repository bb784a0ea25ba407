"""Shared fixtures: a project directory factory."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

ProjectFactory = Callable[..., Path]


@pytest.fixture
def make_project(tmp_path: Path) -> ProjectFactory:
    """Write flows and profiles (name -> YAML text) into a fresh project directory."""

    def make(
        flows: dict[str, str] | None = None,
        profiles: dict[str, str] | None = None,
        settings: str | None = None,
    ) -> Path:
        for directory, files in (("flows", flows or {}), ("auth_profiles", profiles or {})):
            (tmp_path / directory).mkdir(exist_ok=True)
            for name, text in files.items():
                (tmp_path / directory / f"{name}.yaml").write_text(textwrap.dedent(text))
        if settings is not None:
            (tmp_path / "flowrunner.yaml").write_text(textwrap.dedent(settings))
        return tmp_path

    return make
