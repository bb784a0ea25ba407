"""Live reload: a changed flow or profile file is validated and swapped in; an invalid
edit keeps the previous version running and says why."""

from __future__ import annotations

import logging
from pathlib import Path

from flowrunner.loader import FLOWS_DIR, PROFILES_DIR, SETTINGS_FILE, Project, load_project

log = logging.getLogger("flowrunner.reload")


def snapshot(root: Path) -> dict[str, float]:
    """Modification times of every file that makes up the project."""
    times: dict[str, float] = {}
    for directory in (FLOWS_DIR, PROFILES_DIR):
        base = root / directory
        if base.is_dir():
            for path in base.rglob("*"):
                if path.suffix in (".yaml", ".yml") and path.is_file():
                    times[str(path)] = path.stat().st_mtime
    settings = root / SETTINGS_FILE
    if settings.is_file():
        times[str(settings)] = settings.stat().st_mtime
    return times


def reload_project(previous: Project) -> Project:
    """Load the project again; a flow or profile whose file is now invalid keeps its
    previous version (a deleted file removes it)."""
    fresh = load_project(previous.root)
    # By file, not by name: a syntax error can hide the name of the flow it broke.
    broken_files = {problem.position.file for problem in fresh.problems}
    for name, loaded in previous.flows.items():
        if name not in fresh.flows and loaded.file in broken_files:
            fresh.flows[name] = loaded
            log.warning("flow %s: the new version is invalid; the previous one keeps running", name)
    for name, loaded_profile in previous.profiles.items():
        if name not in fresh.profiles and loaded_profile.file in broken_files:
            fresh.profiles[name] = loaded_profile
            log.warning(
                "auth profile %s: the new version is invalid; keeping the previous one", name
            )
    for problem in fresh.problems:
        log.warning("%s", problem.format())
    return fresh
