"""``flowrunner validate`` and ``flowrunner schema`` as a user runs them: a real process."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowrunner.yamlsource import parse_yaml

REPO = Path(__file__).resolve().parent.parent.parent
CORPUS = REPO / "tests" / "corpus"


def flowrunner(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m flowrunner ARGS`` in ``cwd`` and capture what it prints."""
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "flowrunner", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


BROKEN_FLOW = """\
name: sync
steps:
  - id: fetch
    http:
      methd: GET
      url: https://api.example.com/items
  - id: report
    log: ${{ steps.fetsh.status }}
"""
OTHER_BROKEN_FLOW = """\
name: Other
steps:
  - id: hello
    log: hello
"""
GOOD_FLOW = """\
name: fine
steps:
  - id: hello
    log: hello
"""


@pytest.fixture
def broken_project(make_project: Callable[..., Path]) -> Path:
    """A project with two broken flows, one valid flow and one profile."""
    return make_project(
        flows={"sync": BROKEN_FLOW, "other": OTHER_BROKEN_FLOW, "fine": GOOD_FLOW},
        profiles={"api": "name: api\nkind: bearer\ntoken: ${{ secrets.API_TOKEN }}\n"},
    )


def test_the_example_project_is_valid() -> None:
    """The repository's example project validates: exit 0, and it says ok."""
    result = flowrunner("validate", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    flows = len(list((REPO / "flows").glob("*.yaml")))
    profiles = len(list((REPO / "auth_profiles").glob("*.yaml")))
    assert f"ok: {flows} flow(s), {profiles} auth profile(s)" in result.stderr


def test_the_example_project_is_valid_from_elsewhere_with_project(tmp_path: Path) -> None:
    """``--project DIR`` validates a project other than the current directory."""
    result = flowrunner("validate", "--project", str(REPO), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok:" in result.stderr


def test_a_broken_project_prints_file_line_col_and_exits_1(broken_project: Path) -> None:
    """Every error in every file prints as ``file:line:col: message`` with its hint; exit 1."""
    result = flowrunner("validate", cwd=broken_project)
    assert result.returncode == 1
    located = [line for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert located == [
        "flows/other.yaml:1:7: name 'Other': use only lowercase letters, digits and '-'",
        "flows/sync.yaml:5:7: unknown key 'methd'",
    ]
    assert "    hint: did you mean 'method'?" in result.stdout.splitlines()
    assert "2 error(s)" in result.stderr


def test_a_fixed_key_reveals_the_next_error(broken_project: Path) -> None:
    """Once the unknown key is fixed, the reference to a misspelt step is reported with a hint."""
    flow = broken_project / "flows" / "sync.yaml"
    flow.write_text(BROKEN_FLOW.replace("methd", "method"))
    result = flowrunner("validate", str(flow.relative_to(broken_project)), cwd=broken_project)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "flows/sync.yaml:8:10: no step 'fetsh' in this flow",
        "    hint: did you mean 'fetch'?",
    ]


def test_json_format_is_parseable_and_complete(broken_project: Path) -> None:
    """``--format json`` prints one JSON document: valid=false and every error's fields."""
    result = flowrunner("validate", "--format", "json", cwd=broken_project)
    assert result.returncode == 1
    payload = json.loads(result.stdout)
    assert payload["valid"] is False
    assert payload["flows"] == ["fine"]
    assert payload["profiles"] == ["api"]
    errors = payload["errors"]
    assert [(e["file"], e["line"], e["column"]) for e in errors] == [
        ("flows/other.yaml", 1, 7),
        ("flows/sync.yaml", 5, 7),
    ]
    for error in errors:
        assert {"file", "line", "column", "message", "hint", "code"} <= set(error)
        assert isinstance(error["message"], str) and error["message"]
    assert errors[1]["hint"] == "did you mean 'method'?"


def test_json_format_on_a_valid_project() -> None:
    """On a valid project, JSON output says valid=true with the loaded names and no errors."""
    result = flowrunner("validate", "--format", "json", cwd=REPO)
    assert result.returncode == 0
    payload = json.loads(result.stdout)
    assert payload["valid"] is True
    assert payload["errors"] == []
    assert "ermeo-assets-to-iobeya" in payload["flows"]
    assert "iobeya-machine-user" in payload["profiles"]


def test_a_single_file_reports_only_that_file(broken_project: Path) -> None:
    """With one file named, only its errors print; the rest of the project gives context."""
    result = flowrunner("validate", "flows/other.yaml", cwd=broken_project)
    assert result.returncode == 1
    assert result.stdout.startswith("flows/other.yaml:1:7: name 'Other'")
    assert "sync.yaml" not in result.stdout
    clean = flowrunner("validate", "flows/fine.yaml", cwd=broken_project)
    assert clean.returncode == 0, clean.stdout


def test_a_corpus_file_is_checked_against_its_project() -> None:
    """A broken corpus file named with --project reports its declared error and nothing else."""
    result = flowrunner(
        "validate", "--project", ".", "broken/flows/unknown-profile.yaml", cwd=CORPUS
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "broken/flows/unknown-profile.yaml:7:13: unknown auth profile 'svcs'",
        "    hint: did you mean 'svc'?",
    ]


def test_a_nonexistent_path_exits_2(tmp_path: Path) -> None:
    """A path that does not exist is a usage error: exit 2 and a message on stderr."""
    result = flowrunner("validate", "flows/nowhere.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "flows/nowhere.yaml: no such file or directory" in result.stderr
    assert result.stdout == ""


def test_an_unknown_format_is_a_usage_error() -> None:
    """``--format xml`` is refused with a usage error, not a traceback."""
    result = flowrunner("validate", "--format", "xml", cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- schema


@functools.cache
def _schema(kind: str) -> dict[str, Any]:
    """The schema printed by ``flowrunner schema KIND`` (run once per kind)."""
    result = flowrunner("schema", kind, cwd=REPO)
    assert result.returncode == 0, result.stderr
    schema: dict[str, Any] = json.loads(result.stdout)
    return schema


def _data(path: Path) -> Any:
    # flowrunner reads YAML 1.2 booleans, as editors do: `on:` (in retry) is a key, not True;
    # yaml.safe_load (YAML 1.1) would turn it into True and fail the schema.
    doc, problems = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    assert doc is not None and not problems
    return doc.data


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [("flow", "flows/*.yaml"), ("profile", "auth_profiles/*.yaml"), ("settings", None)],
)
def test_schemas_are_valid_and_accept_the_examples(kind: str, pattern: str | None) -> None:
    """Each schema is a valid JSON Schema, and the example files validate against it."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema(kind)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    examples = sorted(REPO.glob(pattern)) + sorted(CORPUS.glob(pattern)) if pattern else []
    for path in examples:
        errors = [error.message for error in validator.iter_errors(_data(path))]
        assert errors == [], path
    if kind == "settings":
        assert list(validator.iter_errors({"server": {"port": 8800}})) == []


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("flow", "broken/flows/unknown-key.yaml"),
        ("flow", "broken/flows/unknown-step-kind.yaml"),
        ("flow", "broken/flows/bad-method.yaml"),
        ("profile", "broken/auth_profiles/unknown-kind.yaml"),
    ],
)
def test_schemas_reject_broken_files(kind: str, path: str) -> None:
    """An editor using the schema flags the same shape mistakes validate reports."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema(kind)
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert list(validator.iter_errors(_data(CORPUS / path)))


def test_an_unknown_schema_kind_is_a_usage_error() -> None:
    """``flowrunner schema bogus`` exits 2 and prints no JSON."""
    result = flowrunner("schema", "bogus", cwd=REPO)
    assert result.returncode == 2
    assert result.stdout == ""
