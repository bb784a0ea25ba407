"""Loads a project directory into validated models, collecting every problem with its position.

One broken file never hides the others: each file is parsed and validated on its own,
then the cross-file checks (references, duplicates) run over everything that loaded.
A flow or profile with problems is left out of ``Project.flows`` / ``Project.profiles``
so that whatever runs the project only ever sees valid definitions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic

from flowrunner.errors import Position, Problem, ProjectInvalid
from flowrunner.model import Flow, Profile, Settings
from flowrunner.model.base import closest
from flowrunner.model.flow import STEP_KINDS, step_kinds_in
from flowrunner.model.profiles import PROFILE_KINDS
from flowrunner.yamlsource import SourceDocument, parse_yaml

FileKind = Literal["flow", "profile", "settings"]
FLOWS_DIR = "flows"
PROFILES_DIR = "auth_profiles"
SETTINGS_FILE = "flowrunner.yaml"
_PROFILE_ADAPTER: pydantic.TypeAdapter[Profile] = pydantic.TypeAdapter(Profile)


@dataclass(frozen=True)
class LoadedFlow:
    flow: Flow
    doc: SourceDocument

    @property
    def file(self) -> str:
        return self.doc.file


@dataclass(frozen=True)
class LoadedProfile:
    profile: Profile
    doc: SourceDocument

    @property
    def file(self) -> str:
        return self.doc.file


@dataclass
class Project:
    root: Path
    flows: dict[str, LoadedFlow] = field(default_factory=dict)
    profiles: dict[str, LoadedProfile] = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)
    problems: list[Problem] = field(default_factory=list)
    # Names whose files exist but are invalid: references to them are not "unknown".
    broken_flows: set[str] = field(default_factory=set)
    broken_profiles: set[str] = field(default_factory=set)

    def raise_if_invalid(self) -> None:
        if self.problems:
            raise ProjectInvalid(sorted(self.problems, key=lambda p: p.position))


# ---------------------------------------------------------------- one file


def classify(path: Path) -> FileKind:
    if path.name == SETTINGS_FILE:
        return "settings"
    if PROFILES_DIR in path.parts[-3:-1]:
        return "profile"
    if FLOWS_DIR in path.parts[-3:-1]:
        return "flow"
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return "flow"
    return "profile" if any(line.startswith("kind:") for line in head.splitlines()) else "flow"


def load_document(path: Path, display: str) -> tuple[SourceDocument | None, list[Problem]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None, [
            Problem(Position(display, 1, 1), "the file is not UTF-8 text", code="encoding")
        ]
    except OSError as exc:
        return None, [Problem(Position(display, 1, 1), f"cannot read the file: {exc.strerror}")]
    return parse_yaml(text, display)


def validate_model(
    doc: SourceDocument, kind: FileKind
) -> tuple[Flow | Profile | Settings | None, list[Problem]]:
    if kind != "settings" and not isinstance(doc.data, dict):
        what = "a flow" if kind == "flow" else "an auth profile"
        return None, [
            Problem(
                doc.position(),
                f"{what} is a mapping of keys, found {type(doc.data).__name__}",
                "name: my-flow\nsteps:\n  - id: hello\n    log: hello"
                if kind == "flow"
                else "name: my-api\nkind: bearer\ntoken: ${{ secrets.MY_API_TOKEN }}",
                code="shape",
            )
        ]
    try:
        if kind == "flow":
            return Flow.model_validate(doc.data), []
        if kind == "profile":
            return _PROFILE_ADAPTER.validate_python(doc.data), []
        return Settings.model_validate(doc.data or {}), []
    except pydantic.ValidationError as exc:
        return None, pydantic_problems(doc, exc)


# ---------------------------------------------------------------- pydantic errors → problems

_EXAMPLES = {
    "steps": "steps:\n  - id: fetch\n    http: {method: GET, url: https://api.example.com/items}",
    "triggers": "triggers:\n  - schedule: {every: 15m}\n  - webhook: {path: my-hook, auth: none}",
    "http": "http: {method: GET, url: https://api.example.com/items}",
    "inputs": "inputs:\n  site: {type: string, default: HQ}",
    "url": "url: ${{ vars.base }}/assets",
    "concurrency": "concurrency: {limit: 1, when_busy: queue}",
}

# What a value of each pydantic type error should have been, in the user's words.
_EXPECTED = {
    "model_type": "a mapping (key: value)",
    "dict_type": "a mapping (key: value)",
    "list_type": "a list",
    "string_type": "text",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}

# Names with a fixed alphabet: what it is, and how to turn a wrong value into a right one.
_PATTERNS: dict[str, tuple[str, Callable[[str], str]]] = {
    "name": (
        "lowercase letters, digits and '-'",
        lambda v: re.sub(r"[^a-z0-9]+", "-", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", v).lower()),
    ),
    "id": (
        "letters, digits and '_' (it is written steps.<id> in expressions)",
        lambda v: re.sub(r"\W+", "_", v),
    ),
    "path": (
        "lowercase letters, digits, '-', '_' and '/' (served under /hooks/)",
        lambda v: re.sub(r"[^a-z0-9_/-]+", "-", v.lower()),
    ),
}
_PATTERNS["call"] = _PATTERNS["name"]


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, bool) or value is None:
        return "null" if value is None else str(value).lower()
    if isinstance(value, int | float):
        return f"the number {value}"
    return "a list" if isinstance(value, list) else "a mapping"


def _data_path(doc: SourceDocument, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The elements of ``loc`` that exist in the data (pydantic's union tags removed)."""
    value, path = doc.data, []
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            if isinstance(value, dict) and str(part) in {str(k) for k in value}:
                key = next(k for k in value if str(k) == str(part))
                value = value[key]
            else:
                continue
        path.append(part)
    return tuple(path)


def _is_shape_error(kind: str) -> bool:
    return kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "union_tag_invalid")


def pydantic_problems(doc: SourceDocument, exc: pydantic.ValidationError) -> list[Problem]:
    # Where a union reports several errors at one place, the list of allowed words says most.
    errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "literal_error")
    paths = [_data_path(doc, tuple(e["loc"])) for e in errors]
    problems: list[Problem] = []
    seen: set[Position] = set()
    for error, path in zip(errors, paths, strict=True):
        # A value that fits one branch of a union reports errors for every branch;
        # keep the most specific ones (the deepest, or a real error at the same place)
        # and drop "wrong type" noise.
        if _is_shape_error(error["type"]) and any(
            other[: len(path)] == path
            and (len(other) > len(path) or not _is_shape_error(other_error["type"]))
            for other_error, other in zip(errors, paths, strict=True)
        ):
            continue
        problem = _problem_from_error(doc, error, path)
        if problem.position not in seen:
            seen.add(problem.position)
            problems.append(problem)
    return problems


def _problem_from_error(doc: SourceDocument, error: Any, path: tuple[Any, ...]) -> Problem:
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    loc = tuple(error["loc"])
    field_name: str | None = next((p for p in reversed(path) if isinstance(p, str)), None)
    if kind == "unknown_key":
        suggestion = ctx.get("suggestion")
        hint: str | None = (
            f"did you mean '{suggestion}'?" if suggestion else f"known keys: {ctx['known']}"
        )
        return Problem(
            doc.position((*loc, ctx["key"]), key=True),
            f"unknown key '{ctx['key']}'",
            hint,
            "unknown_key",
        )
    if kind == "step_kind":
        return _step_kind_problem(doc, loc)
    if kind == "trigger_kind":
        return _trigger_kind_problem(doc, loc)
    if kind == "missing":
        parent = loc[:-1]
        return Problem(
            doc.position(parent),
            f"missing required key '{loc[-1]}'",
            _EXAMPLES.get(str(loc[-1])),
            "missing",
        )
    if kind == "union_tag_invalid":
        tag = ctx.get("tag")
        suggestion = closest(str(tag), list(PROFILE_KINDS))
        return Problem(
            doc.position(("kind",)),
            f"unknown kind '{tag}': expected one of {', '.join(PROFILE_KINDS)}",
            f"did you mean '{suggestion}'?" if suggestion else None,
            "kind",
        )
    if kind == "union_tag_not_found":
        return Problem(
            doc.position(loc),
            f"missing required key 'kind' (one of {', '.join(PROFILE_KINDS)})",
            None,
            "missing",
        )
    if kind == "literal_error":
        value = doc.value_at(path)
        expected = str(ctx.get("expected", ""))
        options = [o.strip().strip("'") for o in expected.replace(" or ", ",").split(",")]
        suggestion = closest(str(value), options)
        return Problem(
            doc.position(path),
            f"{field_name}: {value!r} is not allowed; expected {expected}",
            f"did you mean '{suggestion}'?" if suggestion else None,
            "choice",
        )
    at = ctx.get("at", "")
    position = doc.position((*path, at), key=True) if at != "" else doc.position(path)
    value = doc.value_at(path)
    if kind == "string_pattern_mismatch" and field_name in _PATTERNS and isinstance(value, str):
        rule, fix = _PATTERNS[field_name]
        suggestion = fix(value).strip("-_/")
        return Problem(
            position,
            f"{field_name} {value!r}: use only {rule}",
            f"for example: {field_name}: {suggestion}" if suggestion else None,
            "pattern",
        )
    if kind == "too_short" and field_name:
        return Problem(
            position,
            f"{field_name}: needs at least {ctx.get('min_length', 1)} item(s), found none",
            _EXAMPLES.get(field_name),
            kind,
        )
    message = error["msg"]
    if kind in _EXPECTED and field_name:
        message = f"{field_name}: expected {_EXPECTED[kind]}, found {_describe(value)}"
    elif kind.endswith("_type") and field_name:
        message = f"{field_name}: {message[0].lower()}{message[1:]}"
    elif field_name and not message.startswith(field_name) and path:
        message = f"{field_name}: {message}"
    hint = ctx.get("hint") or (_EXAMPLES.get(field_name or "") if kind.endswith("_type") else None)
    return Problem(position, message, hint, kind)


def _trigger_kind_problem(doc: SourceDocument, loc: tuple[Any, ...]) -> Problem:
    value = doc.value_at(_data_path(doc, loc))
    if isinstance(value, dict):
        for key in value:
            suggestion = closest(str(key), ["schedule", "webhook"])
            if suggestion and key != suggestion:
                return Problem(
                    doc.position((*loc, key), key=True),
                    f"unknown trigger '{key}'",
                    f"did you mean '{suggestion}'?",
                    "trigger_kind",
                )
    return Problem(
        doc.position(loc),
        "a trigger is either 'schedule' or 'webhook'",
        _EXAMPLES["triggers"],
        "trigger_kind",
    )


def _step_kind_problem(doc: SourceDocument, loc: tuple[Any, ...]) -> Problem:
    value = doc.value_at(_data_path(doc, loc))
    position = doc.position(loc)
    kinds = ", ".join(STEP_KINDS)
    if not isinstance(value, dict):
        return Problem(
            position,
            "a step is a mapping with an 'id' and one kind",
            _EXAMPLES["steps"],
            "step_kind",
        )
    found = step_kinds_in(value)
    if len(found) > 1:
        return Problem(
            position,
            f"a step has exactly one kind; this one has {' and '.join(found)}",
            "split it into several steps",
            "step_kind",
        )
    from flowrunner.model.flow import StepBase

    common = StepBase.known_keys() | {
        "steps",
        "outputs",
        "concurrency",
        "cases",
        "default",
        "catch",
        "finally",
        "inputs",
        "level",
    }
    strangers = [k for k in value if k not in common]
    for stranger in strangers:
        suggestion = closest(str(stranger), list(STEP_KINDS))
        if suggestion:
            return Problem(
                doc.position((*loc, stranger), key=True),
                f"unknown step kind '{stranger}'",
                f"did you mean '{suggestion}'? A step is one of: {kinds}",
                "step_kind",
            )
    name = f"step '{value['id']}'" if "id" in value else "this step"
    return Problem(position, f"{name} has no kind: add one of {kinds}", None, "step_kind")


# ---------------------------------------------------------------- the project


def find_project_root(start: Path) -> Path:
    """The nearest directory at or above ``start`` that looks like a project."""
    start = start.resolve()
    for candidate in [start, *start.parents]:
        if any(
            (candidate / marker).exists() for marker in (FLOWS_DIR, PROFILES_DIR, SETTINGS_FILE)
        ):
            return candidate
    return start


def project_files(root: Path) -> list[tuple[Path, FileKind]]:
    files: list[tuple[Path, FileKind]] = []
    if (root / SETTINGS_FILE).is_file():
        files.append((root / SETTINGS_FILE, "settings"))
    for directory, kind in ((PROFILES_DIR, "profile"), (FLOWS_DIR, "flow")):
        base = root / directory
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.suffix in (".yaml", ".yml") and path.is_file():
                    files.append((path, kind))  # type: ignore[arg-type]
    return files


def expand_paths(paths: list[Path]) -> list[tuple[Path, FileKind]]:
    files: list[tuple[Path, FileKind]] = []
    for path in paths:
        if path.is_dir():
            if any((path / m).exists() for m in (FLOWS_DIR, PROFILES_DIR, SETTINGS_FILE)):
                files.extend(project_files(path))
            else:
                for child in sorted(path.rglob("*")):
                    if child.suffix in (".yaml", ".yml") and child.is_file():
                        files.append((child, classify(child)))
        else:
            files.append((path, classify(path)))
    return files


def _display(path: Path, root: Path, cwd: Path) -> str:
    """How a file is named in messages: relative to the current directory when inside it."""
    resolved = path if path.is_absolute() and ".." not in path.parts else path.resolve()
    for base in (cwd, root):
        if resolved.is_relative_to(base):
            return str(resolved.relative_to(base))
    return str(path)


def load_project(root: Path, paths: list[Path] | None = None) -> Project:
    """Load and check a project. With ``paths``, only problems in those files are kept,
    but the rest of the project is still loaded so that references resolve."""
    from flowrunner.references import check_project

    root = root.resolve()
    project = Project(root=root)
    files = project_files(root)
    selected: set[Path] | None = None
    if paths:
        extra = expand_paths(paths)
        selected = {p.resolve() for p, _ in extra}
        known = {p.resolve() for p, _ in files}
        files += [(p, k) for p, k in extra if p.resolve() not in known]
    displays: dict[str, Path] = {}
    cwd = Path.cwd().resolve()
    for path, kind in files:
        display = _display(path, root, cwd)
        displays[display] = path.resolve()
        _load_into(project, path, kind, display)
    check_project(project)
    if selected is not None:
        project.problems = [
            p for p in project.problems if displays.get(p.position.file, Path()) in selected
        ]
    project.problems.sort(key=lambda p: p.position)
    return project


def _load_into(project: Project, path: Path, kind: FileKind, display: str) -> None:
    doc, problems = load_document(path, display)
    if doc is None or problems:
        project.problems.extend(problems)
        if doc is not None and isinstance(doc.data, dict) and isinstance(doc.data.get("name"), str):
            (project.broken_flows if kind == "flow" else project.broken_profiles).add(
                doc.data["name"]
            )
        return
    model, problems = validate_model(doc, kind)
    project.problems.extend(problems)
    name = doc.data.get("name") if isinstance(doc.data, dict) else None
    if model is None:
        if isinstance(name, str):
            (project.broken_flows if kind == "flow" else project.broken_profiles).add(name)
        return
    if isinstance(model, Flow):
        project.flows.setdefault(model.name, LoadedFlow(model, doc))
        if project.flows[model.name].doc is not doc:
            _duplicate(project, doc, "flow", model.name, project.flows[model.name].doc)
    elif isinstance(model, Settings):
        project.settings = model
    else:
        project.profiles.setdefault(model.name, LoadedProfile(model, doc))
        if project.profiles[model.name].doc is not doc:
            _duplicate(project, doc, "auth profile", model.name, project.profiles[model.name].doc)


def _duplicate(
    project: Project, doc: SourceDocument, what: str, name: str, first: SourceDocument
) -> None:
    project.problems.append(
        Problem(
            doc.position(("name",)),
            f"duplicate {what} name '{name}' (already defined in {first.position(('name',))})",
            "names are unique across the project; rename one of them",
            "duplicate_name",
        )
    )
