"""Every error flowrunner raises on purpose.

::

    FlowrunnerError
     ├── ValidationError          one mistake in a flow, profile or settings file
     ├── ProjectInvalid           a project with one or more ValidationErrors
     ├── ExpressionError          a ${{ }} expression that failed while running
     └── ConfigurationError       a setting or secret the operator must fix

Each class's docstring is its default message; the CLI maps each to an exit code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


class FlowrunnerError(Exception):
    """flowrunner failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, order=True)
class Position:
    """A place in a source file; line and column count from 1, as editors do."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One validation finding: where, what, and (when it helps) how to fix it."""

    position: Position
    message: str
    hint: str | None = None
    code: str = "invalid"

    def format(self) -> str:
        text = f"{self.position}: {self.message}"
        if self.hint:
            text += "\n" + "\n".join("    " + line for line in f"hint: {self.hint}".splitlines())
        return text

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.position.file,
            "line": self.position.line,
            "column": self.position.column,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
        }


class ValidationError(FlowrunnerError):
    """A flow or profile file is invalid."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.format())
        self.problem = problem


@dataclass
class ProblemList:
    """Collects problems while loading, so one bad file never hides the others."""

    problems: list[Problem] = field(default_factory=list)

    def add(
        self,
        position: Position,
        message: str,
        hint: str | None = None,
        code: str = "invalid",
    ) -> None:
        self.problems.append(Problem(position, message, hint, code))

    def extend(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(problems)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def __len__(self) -> int:
        return len(self.problems)

    def sorted(self) -> list[Problem]:
        return sorted(self.problems, key=lambda p: p.position)


class ProjectInvalid(FlowrunnerError):
    """The project has validation errors."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"{len(problems)} validation error(s)")
        self.problems = problems


class ExpressionError(FlowrunnerError):
    """An expression failed while running."""


class ConfigurationError(FlowrunnerError):
    """flowrunner is not configured correctly."""

    exit_code = 2
