"""The broken corpus: one mistake per file, each reported once, at its place, in plain words.

``tests/corpus`` is a small valid project (profiles ``svc``, ``bot``, ``as-user``; flows
``child`` and ``parent``) that gives context to ``tests/corpus/broken``, where every file
holds one mistake and declares on its first lines what ``flowrunner validate`` must say::

    # expect: LINE:COL words that must all appear in the message or its hint
    # expect: nothing (why this file is clean, e.g. the first half of a duplicate)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowrunner.errors import Problem
from flowrunner.loader import Project, load_project

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
BROKEN = CORPUS / "broken"
BROKEN_FILES = sorted(p for p in BROKEN.rglob("*") if p.suffix in (".yaml", ".yml"))
_EXPECT = re.compile(r"^# expect: (?:(?P<line>\d+):(?P<column>\d+) (?P<words>.+)|nothing\b.*)$")


@dataclass(frozen=True)
class Expected:
    line: int
    column: int
    words: tuple[str, ...]


def expectations(path: Path) -> list[Expected]:
    """The ``# expect:`` lines of a corpus file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    found: list[Expected] = []
    declared = False
    for line in text.splitlines():
        match = _EXPECT.match(line)
        if match is None:
            continue
        declared = True
        if match["line"]:
            found.append(
                Expected(int(match["line"]), int(match["column"]), tuple(match["words"].split()))
            )
    assert declared, f"{path.relative_to(CORPUS)} declares no '# expect:' line"
    return found


def _resolve(file: str) -> Path:
    """The file a problem is about (positions are relative to the cwd or the project)."""
    path = Path(file)
    for base in (Path.cwd(), CORPUS):
        if (base / path).exists():
            return (base / path).resolve()
    return path.resolve()


@pytest.fixture(scope="module")
def project() -> Project:
    """The corpus project with the broken files added to it."""
    return load_project(CORPUS, paths=[BROKEN])


def problems_in(project: Project, path: Path) -> list[Problem]:
    return [p for p in project.problems if _resolve(p.position.file) == path.resolve()]


def _ids(path: Path) -> str:
    return str(path.relative_to(BROKEN))


def test_the_corpus_is_big_enough() -> None:
    """The corpus holds at least 40 broken flows and profiles, both kinds represented."""
    broken = [p for p in BROKEN_FILES if expectations(p)]
    assert len(broken) >= 40
    assert any(p.parent.name == "auth_profiles" for p in broken)
    assert any(p.parent.name == "flows" for p in broken)


@pytest.mark.parametrize("path", BROKEN_FILES, ids=_ids)
def test_broken_file_is_reported_at_its_place(project: Project, path: Path) -> None:
    """Each mistake is reported at its declared line and column, with its declared words."""
    expected = expectations(path)
    problems = problems_in(project, path)
    found = {(p.position.line, p.position.column) for p in problems}
    assert found == {(e.line, e.column) for e in expected}, "\n".join(p.format() for p in problems)
    for want in expected:
        text = " ".join(
            f"{p.message} {p.hint or ''}"
            for p in problems
            if (p.position.line, p.position.column) == (want.line, want.column)
        ).lower()
        missing = [word for word in want.words if word.lower() not in text]
        assert not missing, f"{missing} not in: {text}"


@pytest.mark.parametrize("path", BROKEN_FILES, ids=_ids)
def test_broken_file_yields_one_error_per_mistake(project: Project, path: Path) -> None:
    """A file yields exactly as many errors as it declares, each a sentence, not a traceback."""
    problems = problems_in(project, path)
    assert len(problems) == len(expectations(path)), "\n".join(p.format() for p in problems)
    for problem in problems:
        assert problem.position.line >= 1
        assert problem.position.column >= 1
        text = problem.format()
        for noise in ("Traceback", "instance of", "<class", "pydantic", "{host"):
            assert noise not in text


def test_context_files_are_valid() -> None:
    """The corpus project without the broken files validates cleanly."""
    project = load_project(CORPUS)
    assert [p.format() for p in project.problems] == []
    assert set(project.flows) == {"child", "parent"}
    assert set(project.profiles) == {"svc", "bot", "as-user"}


def test_broken_files_do_not_stop_the_others_loading(project: Project) -> None:
    """The valid flows and profiles load next to the broken ones; no broken one is runnable."""
    assert set(project.flows) == {"child", "parent", "dup-name", "dup-path-a"}
    assert set(project.profiles) == {"svc", "bot", "as-user", "dup-profile"}
    assert project.flows["dup-name"].file.endswith("dup-name-a.yaml")
    assert project.profiles["dup-profile"].file.endswith("dup-profile-a.yaml")
    files_with_problems = {_resolve(p.position.file) for p in project.problems}
    for loaded in [*project.flows.values(), *project.profiles.values()]:
        assert _resolve(loaded.file) not in files_with_problems


def test_every_problem_belongs_to_a_broken_file(project: Project) -> None:
    """With paths given, only problems in those files are reported, sorted by position."""
    broken = {p.resolve() for p in BROKEN_FILES}
    assert project.problems
    assert all(_resolve(p.position.file) in broken for p in project.problems)
    assert project.problems == sorted(project.problems, key=lambda p: p.position)
