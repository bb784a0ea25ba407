"""Whatever a file holds, validation answers with positioned problems and never raises."""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrunner.loader import load_project

REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLE_FLOW = REPO / "flows" / "ermeo-assets-to-iobeya.yaml"
EXAMPLE_TEXT = EXAMPLE_FLOW.read_text(encoding="utf-8")
EXAMPLE_PROFILES = ("ermeo-service-account", "iobeya-machine-user")
DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Words the models know, so that random documents get past the first unknown key now and then.
KEYS = [
    "name", "description", "triggers", "schedule", "webhook", "cron", "every", "timezone",
    "path", "auth", "hmac", "secret", "methods", "respond", "dedupe", "key", "for", "inputs",
    "type", "default", "vars", "outputs", "concurrency", "limit", "timeout", "steps", "id",
    "if", "http", "method", "url", "query", "headers", "json", "form", "body", "expect",
    "paginate", "next_url", "items", "max_pages", "set", "for_each", "group", "catch",
    "finally", "switch", "cases", "call", "wait", "log", "fail", "retry", "on", "kind",
    "token", "grant", "token_url", "base_url", "allowed_hosts", "username", "password",
    "login", "capture", "notify", "remind_before",
]  # fmt: skip
FRAGMENTS = [
    "${{", "}}", "{{", "{{ x }}", "${{ steps.a.outputs.b }}", "${{ inputs.x | length }}",
    "${{ item }}", "${{ ''.__class__ }}", "${{ (", "\t", "\n", ": ", "- ", "#", "&a", "*a",
    "!!python/object", "é", "日本語", "\u2028", "\x85", "$.data[*].id", "$..[", "0 7 * * MON-FRI",
    "61 * * * *", "15m", "-1s", "GET", "oauth2", "bearer", "connected_user", "svc", "2xx", "600",
]  # fmt: skip

texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(FRAGMENTS),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=5), max_size=4).map("".join),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
keys = st.one_of(st.sampled_from(KEYS), texts, st.integers(min_value=-5, max_value=999))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=25,
)
# Mostly mappings with the keys a flow or a profile starts with, so validation goes deep.
shaped = st.fixed_dictionaries(
    {"name": st.one_of(st.just("a-flow"), texts)},
    optional={
        "kind": st.sampled_from(["bearer", "oauth2", "connected_user", "api_key", "session"]),
        "steps": st.lists(documents, max_size=3),
        "triggers": st.lists(documents, max_size=2),
        "token": texts,
    },
).flatmap(lambda base: st.dictionaries(keys, documents, max_size=3).map(lambda x: {**base, **x}))


@st.composite
def dumped(draw: st.DrawFn) -> str:
    data = draw(st.one_of(documents, shaped))
    return yaml.safe_dump(
        data,
        sort_keys=False,
        allow_unicode=draw(st.booleans()),
        default_flow_style=draw(st.sampled_from([False, True, None])),
    )


any_text = st.one_of(
    dumped(),
    st.text(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=10), max_size=30).map("".join),
)


def _copy_profiles(root: Path) -> None:
    """The auth profiles the example flow uses, so that its references resolve."""
    (root / "auth_profiles").mkdir(exist_ok=True)
    for name in EXAMPLE_PROFILES:
        shutil.copy(REPO / "auth_profiles" / f"{name}.yaml", root / "auth_profiles")


def check(files: dict[str, str | bytes], copy_profiles: bool = False) -> None:
    """Write ``files`` into a fresh project and load it: no exception, sane positions."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "flows").mkdir()
        (root / "auth_profiles").mkdir()
        if copy_profiles:
            _copy_profiles(root)
        lines: dict[str, int] = {}
        for name, content in files.items():
            path = root / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
            # YAML breaks lines at \r, NEL and the Unicode separators too, not only at \n.
            text = path.read_bytes().decode("utf-8", errors="replace")
            lines[name] = len(re.split("\r\n|[\n\r\x85\u2028\u2029]", text))
        project = load_project(root)
        for problem in project.problems:
            position = problem.position
            assert position.line >= 1, problem.format()
            assert position.column >= 1, problem.format()
            assert problem.message.strip()
            if position.file in lines:
                assert position.line <= lines[position.file] + 1, problem.format()
        runnable = {loaded.file for loaded in [*project.flows.values(), *project.profiles.values()]}
        assert not runnable & {p.position.file for p in project.problems}


@SETTINGS
@given(text=any_text)
def test_random_yaml_as_a_flow_never_raises(text: str) -> None:
    """A flow file with any YAML or text in it yields problems with positions, never raises."""
    check({"flows/f.yaml": text})


@SETTINGS
@given(text=any_text)
def test_random_yaml_as_a_profile_never_raises(text: str) -> None:
    """An auth profile file with any YAML or text in it yields positioned problems."""
    check({"auth_profiles/p.yaml": text, "flows/uses-it.yaml": EXAMPLE_TEXT})


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    """Bytes that are not text (or barely are) yield problems, never an exception."""
    check({"flows/f.yaml": data, "auth_profiles/p.yaml": data})


# ---------------------------------------------------------------- mutations of a real flow

VALUES = [
    "42", "true", "null", "[]", "{}", "x", "'${{ nope }}'", "{{ x }}", "-1", "[1, [2]]", "",
    ".inf", "-.inf", ".nan", "1e400", "99999999999999999999", "99999999999999d", "0", "-0.5",
    "2026-01-01", "!!binary aGk=", "&anchor x", "*nowhere", "'\\t'", "~",
]  # fmt: skip
WORDS = ["nam", "stepz", "htpp", "url", "id", "for_each", "auth", "on", "<<", "? x", "- y"]


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


@st.composite
def mutation(draw: st.DrawFn, text: str) -> str:
    lines = _lines(text)
    if not lines:
        return draw(st.sampled_from(VALUES))
    i = draw(st.integers(0, len(lines) - 1))
    line = lines[i]
    op = draw(
        st.sampled_from(
            [
                "delete_line",
                "duplicate_line",
                "tab",
                "truncate",
                "rename",
                "retype",
                "delete_key",
                "replace_value",
            ]
        )
    )
    if op == "delete_line":
        del lines[i]
    elif op == "duplicate_line":
        lines.insert(i, line)
    elif op == "tab":
        at = draw(st.integers(0, len(line)))
        lines[i] = line[:at] + "\t" + line[at:]
    elif op == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    elif op == "rename" and ":" in line:
        indent = len(line) - len(line.lstrip(" -"))
        lines[i] = line[:indent] + draw(st.sampled_from(WORDS)) + line[line.index(":") :]
    elif op == "retype" and ": " in line:
        lines[i] = line[: line.index(": ") + 2] + draw(st.sampled_from(VALUES)) + "\n"
    elif op in ("delete_key", "replace_value"):
        return _change_data(text, draw, delete=op == "delete_key")
    return "".join(lines)


def _change_data(text: str, draw: st.DrawFn, *, delete: bool) -> str:
    """Delete a key (or item) anywhere in the data, or replace a value with a random one."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    node: Any = data
    while isinstance(node, dict | list) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()) or not isinstance(node[key], dict | list) or not node[key]:
            if delete:
                del node[key]
            else:
                node[key] = draw(documents)
            break
        node = node[key]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    text = EXAMPLE_TEXT
    for _ in range(draw(st.integers(1, 3))):
        text = draw(mutation(text))
    return text


def test_the_example_flow_is_valid_before_mutation() -> None:
    """The unmutated example flow loads without problems next to the example profiles."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _copy_profiles(root)
        (root / "flows").mkdir()
        (root / "flows" / "example.yaml").write_text(EXAMPLE_TEXT)
        project = load_project(root)
        assert [p.format() for p in project.problems] == []
        assert "ermeo-assets-to-iobeya" in project.flows


@SETTINGS
@given(text=mutated_example())
def test_mutations_of_the_example_flow_never_raise(text: str) -> None:
    """Deleting, duplicating, renaming, retyping, tabbing or truncating never crashes loading."""
    check({"flows/example.yaml": text}, copy_profiles=True)


NASTY: list[Any] = [
    None, True, -1, 2**64, float("inf"), float("nan"), "", "\t{{ x }}", "99999999999999d",
    "${{ steps.nowhere.outputs.x }}", [], {"a": [None]},
]  # fmt: skip


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [path] + [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(value, list):
        return [path] + [leaf for i, v in enumerate(value) for leaf in _leaves(v, (*path, i))]
    return [path]


def test_every_value_of_the_example_flow_replaced_by_a_nasty_one_never_raises() -> None:
    """Each value of the example flow, replaced in turn by each odd value, yields problems."""
    example = yaml.safe_load(EXAMPLE_TEXT)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _copy_profiles(root)
        (root / "flows").mkdir()
        for path in _leaves(example)[1:]:
            for nasty in NASTY:
                data = copy.deepcopy(example)
                parent = data
                for part in path[:-1]:
                    parent = parent[part]
                parent[path[-1]] = nasty
                text = yaml.dump(data, Dumper=DUMPER, sort_keys=False, allow_unicode=True)
                (root / "flows" / "example.yaml").write_text(text, encoding="utf-8")
                project = load_project(root)
                for problem in project.problems:
                    assert problem.position.line >= 1
                    assert problem.position.column >= 1
