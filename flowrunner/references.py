"""Cross-checks that need the whole project: expressions and the names they use,
step order, auth profiles, called flows, duplicates, and JSONPaths.

Every ``${{ }}`` in the project is compiled here, once, at load time; the engine later
finds the compiled forms in the expression cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flowrunner.errors import Position, Problem
from flowrunner.expressions import (
    BARE_BRACES,
    EXPRESSION,
    GLOBAL_NAMES,
    ExpressionSyntaxError,
    Reference,
    compile_template,
    condition_source,
)
from flowrunner.jsonpaths import InvalidJsonPath, compile_jsonpath
from flowrunner.loader import LoadedFlow, Project
from flowrunner.model import (
    CallStep,
    ConnectedUserProfile,
    Flow,
    ForEachStep,
    GroupStep,
    HttpStep,
    OAuth2Profile,
    SessionProfile,
    SetStep,
    Step,
    SwitchStep,
)
from flowrunner.model.base import closest
from flowrunner.yamlsource import SourceDocument

STEP_FIELDS = ("status", "headers", "body", "outputs", "error")
RUN_FIELDS = ("id", "flow", "started_at", "user")
WEBHOOK_TRIGGER_FIELDS = ("body", "headers", "query", "method", "path", "user", "kind")
SCHEDULE_TRIGGER_FIELDS = ("fired_at", "kind")
FLOW_NAMES = frozenset({"trigger", "inputs", "vars", "steps", "secrets", "run"})
# Names that exist only in some places of a flow, and where.
_ONLY_IN = {
    "item": "'item' exists only in the steps of a for_each",
    "index": "'index' exists only in the steps of a for_each",
    "error": "'error' exists only in the catch steps of a group",
    "page": "'page' exists only in a paginate stop condition",
}
_NESTED_KEYS = {
    "for_each": ("steps",),
    "group": ("group", "catch", "finally"),
    "switch": ("cases", "default"),
}


@dataclass
class Scope:
    """What an expression at some place in a flow may refer to."""

    names: frozenset[str]
    visible_steps: frozenset[str] = frozenset()
    all_steps: dict[str, Step] = field(default_factory=dict)


class FlowChecker:
    def __init__(self, project: Project, loaded: LoadedFlow) -> None:
        self.project = project
        self.flow: Flow = loaded.flow
        self.doc: SourceDocument = loaded.doc
        self.problems: list[Problem] = []
        self.all_steps: dict[str, Step] = {}
        self.trigger_fields = self._trigger_fields()

    def _trigger_fields(self) -> tuple[str, ...]:
        if self.flow.schedules and not self.flow.webhooks:
            return SCHEDULE_TRIGGER_FIELDS
        if self.flow.webhooks and not self.flow.schedules:
            return WEBHOOK_TRIGGER_FIELDS
        return WEBHOOK_TRIGGER_FIELDS + SCHEDULE_TRIGGER_FIELDS[:1]

    def add(
        self,
        loc: tuple[Any, ...],
        message: str,
        hint: str | None = None,
        code: str = "reference",
        *,
        key: bool = False,
        offset: int | None = None,
    ) -> None:
        self.problems.append(
            Problem(self.doc.position(loc, key=key, offset=offset), message, hint, code)
        )

    def check(self) -> list[Problem]:
        self._collect_ids(self.flow.steps, ("steps",))
        base = Scope(frozenset({"inputs", "secrets", "trigger", "run"}))
        self.check_value(self.flow.vars, ("vars",), base)
        for i, trigger in enumerate(self.doc.data.get("triggers") or []):
            self.check_value(trigger, ("triggers", i), Scope(frozenset({"secrets", "trigger"})))
        self.check_steps(self.flow.steps, ("steps",), frozenset(), frozenset())
        everything = Scope(FLOW_NAMES, frozenset(self.all_steps), self.all_steps)
        self.check_value(self.flow.outputs, ("outputs",), everything)
        return self.problems

    def _collect_ids(self, steps: list[Step], loc: tuple[Any, ...]) -> None:
        for i, step in enumerate(steps):
            if step.id in self.all_steps:
                self.add(
                    (*loc, i, "id"),
                    f"duplicate step id '{step.id}'",
                    "step ids are unique within a flow",
                    "duplicate_step",
                )
            else:
                self.all_steps[step.id] = step
            for key, children in step.children():
                self._collect_ids(children, (*loc, i, *key.split(".", 1)))

    # ------------------------------------------------------------ steps

    def check_steps(
        self,
        steps: list[Step],
        loc: tuple[Any, ...],
        visible: frozenset[str],
        extra: frozenset[str],
    ) -> None:
        for i, step in enumerate(steps):
            here = (*loc, i)
            scope = Scope(FLOW_NAMES | extra, visible, self.all_steps)
            raw = self.doc.value_at(here)
            nested = _NESTED_KEYS.get(step.kind, ())
            for key, value in raw.items() if isinstance(raw, dict) else []:
                if key in nested or key == "id" or (key == "outputs" and step.kind == "http"):
                    continue
                if key in ("if", "switch") or (key == "for_each" and isinstance(value, str)):
                    self.check_string(
                        condition_source(value) if isinstance(value, str) else value,
                        (*here, key),
                        scope,
                        bare=isinstance(value, str) and "${{" not in value,
                    )
                elif key == "http" and isinstance(step, HttpStep):
                    self.check_http(step, here, scope)
                else:
                    self.check_value(value, (*here, key), scope)
            self.check_kind(step, here, visible, extra)
            visible = visible | {step.id}
            if isinstance(step, GroupStep):
                visible = visible | {s.id for s in step.group}

    def check_kind(
        self, step: Step, here: tuple[Any, ...], visible: frozenset[str], extra: frozenset[str]
    ) -> None:
        if isinstance(step, ForEachStep):
            self.check_steps(step.steps, (*here, "steps"), visible, extra | {"item", "index"})
        elif isinstance(step, GroupStep):
            self.check_steps(step.group, (*here, "group"), visible, extra)
            tried = visible | {s.id for s in step.group}
            self.check_steps(step.catch, (*here, "catch"), tried, extra | {"error"})
            self.check_steps(step.finally_, (*here, "finally"), tried, extra)
        elif isinstance(step, SwitchStep):
            for case, children in step.cases.items():
                self.check_steps(children, (*here, "cases", case), visible, extra)
            self.check_steps(step.default, (*here, "default"), visible, extra)
        elif isinstance(step, CallStep):
            self.check_call(step, here)

    def check_http(self, step: HttpStep, here: tuple[Any, ...], scope: Scope) -> None:
        loc = (*here, "http")
        raw = self.doc.value_at(loc)
        for key, value in raw.items():
            if key == "paginate":
                continue
            self.check_value(value, (*loc, key), scope)
        paginate = step.http.paginate
        if paginate is not None:
            ploc = (*loc, "paginate")
            for name in ("next_url", "items"):
                self.check_jsonpath(getattr(paginate, name), (*ploc, name))
            if paginate.next_cursor is not None:
                self.check_jsonpath(paginate.next_cursor.path, (*ploc, "next_cursor", "path"))
            if paginate.stop is not None:
                self.check_string(
                    condition_source(paginate.stop),
                    (*ploc, "stop"),
                    Scope(scope.names | {"page"}, scope.visible_steps, scope.all_steps),
                    bare="${{" not in paginate.stop,
                )
        for name, path in step.outputs.items():
            self.check_jsonpath(path, (*here, "outputs", name))
        self.check_auth(step, loc)

    def check_auth(self, step: HttpStep, loc: tuple[Any, ...]) -> None:
        name = step.http.auth
        url = step.http.url
        if name is None:
            if not url.startswith(("http://", "https://", "${{")):
                self.add(
                    (*loc, "url"),
                    f"relative URL {url!r} needs an auth profile with a base_url",
                    "write an absolute URL, or add auth: <profile>",
                    "url",
                )
            return
        if "${{" in name:
            self.add(
                (*loc, "auth"), "auth names a profile; it cannot be an expression", code="auth"
            )
            return
        loaded = self.project.profiles.get(name)
        if loaded is None:
            if name in self.project.broken_profiles:
                return  # its own file already reports why
            suggestion = closest(name, list(self.project.profiles))
            self.add(
                (*loc, "auth"),
                f"unknown auth profile '{name}'",
                f"did you mean '{suggestion}'?"
                if suggestion
                else "add a file to auth_profiles/ with this name",
                "unknown_profile",
            )
            return
        profile = loaded.profile
        if isinstance(profile, ConnectedUserProfile) and self.flow.schedules:
            self.add(
                (*loc, "auth"),
                f"auth profile '{name}' acts as the connected user, but this "
                "flow has a schedule trigger, where there is no user",
                "use a service-account profile for scheduled runs",
                "connected_user",
            )
        if not url.startswith(("http://", "https://", "${{")) and not profile.base_url:
            self.add(
                (*loc, "url"),
                f"relative URL {url!r} but auth profile '{name}' has no base_url",
                "write an absolute URL, or set base_url in the profile",
                "url",
            )

    def check_call(self, step: CallStep, here: tuple[Any, ...]) -> None:
        target = self.project.flows.get(step.call)
        if target is None:
            if step.call in self.project.broken_flows:
                return
            suggestion = closest(step.call, list(self.project.flows))
            self.add(
                (*here, "call"),
                f"unknown flow '{step.call}'",
                f"did you mean '{suggestion}'?" if suggestion else None,
                "unknown_flow",
            )
            return
        declared = target.flow.inputs
        for name in step.inputs:
            if name not in declared:
                suggestion = closest(name, list(declared))
                self.add(
                    (*here, "inputs", name),
                    f"flow '{step.call}' has no input '{name}'",
                    f"did you mean '{suggestion}'?"
                    if suggestion
                    else f"its inputs: {', '.join(declared) or 'none'}",
                    "input",
                    key=True,
                )
        for name, spec in declared.items():
            if spec.required and name not in step.inputs:
                self.add(
                    (*here, "call"),
                    f"flow '{step.call}' needs input '{name}'",
                    f"inputs: {{{name}: ...}}",
                    "input",
                )

    # ------------------------------------------------------------ values and expressions

    def check_value(self, value: Any, loc: tuple[Any, ...], scope: Scope) -> None:
        for sub_loc, text in _strings(value, loc):
            self.check_string(text, sub_loc, scope)

    def check_string(
        self, text: Any, loc: tuple[Any, ...], scope: Scope, bare: bool = False
    ) -> None:
        if not isinstance(text, str):
            return
        if "${{" not in text:
            match = BARE_BRACES.search(text)
            if match:
                self.add(
                    loc,
                    f"'{match[0]}' is not an expression here",
                    "write ${{ ... }} (with the dollar sign); for a literal '{{' write ${{ '{{' }}",
                    "bare_braces",
                    offset=match.start(),
                )
            return
        # A bare condition was wrapped in ${{ }}: its offsets are 4 characters off.
        shift = -4 if bare else 0
        try:
            template = compile_template(text)
        except ExpressionSyntaxError as exc:
            offset = _offset_of(text, exc.source) + shift
            self.add(
                loc, f"invalid expression: {exc.reason}", None, "syntax", offset=max(offset, 0)
            )
            return
        for expression in template.expressions:
            offset = _offset_of(text, expression.source) + shift
            for reference in expression.references:
                self.check_reference(reference, loc, scope, max(offset, 0))

    def check_reference(
        self, ref: Reference, loc: tuple[Any, ...], scope: Scope, offset: int
    ) -> None:
        def report(message: str, hint: str | None = None, code: str = "reference") -> None:
            self.add(loc, message, hint, code, offset=offset)

        if ref.root in GLOBAL_NAMES:
            return
        if ref.root not in scope.names:
            suggestion = closest(ref.root, list(scope.names))
            report(
                f"unknown name '{ref.root}' in ${{{{ {ref} }}}}",
                f"did you mean '{suggestion}'?"
                if suggestion
                else _ONLY_IN.get(ref.root, f"names here: {', '.join(sorted(scope.names))}"),
                "unknown_name",
            )
            return
        first = ref.path[0] if ref.path else None
        if not isinstance(first, str):
            return
        if ref.root == "steps":
            self.check_step_reference(ref, scope, report)
        elif ref.root == "inputs" and first not in self.flow.inputs:
            suggestion = closest(first, list(self.flow.inputs))
            report(
                f"unknown input '{first}'",
                f"did you mean '{suggestion}'?" if suggestion else "declare it under inputs:",
                "unknown_input",
            )
        elif ref.root == "vars" and first not in self.flow.vars:
            suggestion = closest(first, [str(k) for k in self.flow.vars])
            report(
                f"unknown var '{first}'",
                f"did you mean '{suggestion}'?" if suggestion else "declare it under vars:",
                "unknown_var",
            )
        elif ref.root == "trigger" and first not in self.trigger_fields:
            suggestion = closest(first, list(self.trigger_fields))
            report(
                f"trigger has no field '{first}'",
                f"did you mean '{suggestion}'?"
                if suggestion
                else f"fields: {', '.join(self.trigger_fields)}",
                "trigger_field",
            )
        elif ref.root == "run" and first not in RUN_FIELDS:
            report(f"run has no field '{first}'", f"fields: {', '.join(RUN_FIELDS)}")

    def check_step_reference(self, ref: Reference, scope: Scope, report: Any) -> None:
        step_id = str(ref.path[0])
        step = self.all_steps.get(step_id)
        if step is None:
            suggestion = closest(step_id, list(self.all_steps))
            report(
                f"no step '{step_id}' in this flow",
                f"did you mean '{suggestion}'?" if suggestion else None,
                "unknown_step",
            )
            return
        if step_id not in scope.visible_steps:
            report(
                f"step '{step_id}' has not run at this point",
                "a step can use the steps that come before it (not those nested in a "
                "for_each or switch)",
                "step_order",
            )
            return
        if len(ref.path) < 2 or not isinstance(ref.path[1], str):
            return
        attribute = ref.path[1]
        if attribute not in STEP_FIELDS:
            suggestion = closest(attribute, list(STEP_FIELDS))
            report(
                f"steps.{step_id} has no '{attribute}'",
                f"did you mean '{suggestion}'?"
                if suggestion
                else f"a step has: {', '.join(STEP_FIELDS)}",
                "step_field",
            )
            return
        if attribute != "outputs" or len(ref.path) < 3 or not isinstance(ref.path[2], str):
            return
        declared = _declared_outputs(step, self.project)
        name = ref.path[2]
        if declared is not None and name not in declared:
            suggestion = closest(name, list(declared))
            report(
                f"step '{step_id}' has no output '{name}'",
                f"did you mean '{suggestion}'?"
                if suggestion
                else f"its outputs: {', '.join(declared) or 'none'}",
                "unknown_output",
            )

    def check_jsonpath(self, path: str | None, loc: tuple[Any, ...]) -> None:
        if path is None:
            return
        try:
            compile_jsonpath(path)
        except InvalidJsonPath as exc:
            self.add(loc, str(exc), "JSONPath looks like $.data[*].id", "jsonpath")


def _declared_outputs(step: Step, project: Project) -> list[str] | None:
    if isinstance(step, HttpStep):
        return list(step.outputs)
    if isinstance(step, SetStep):
        return [str(k) for k in step.set]
    if isinstance(step, CallStep) and step.call in project.flows:
        return [str(k) for k in project.flows[step.call].flow.outputs]
    return None


def _offset_of(text: str, source: str) -> int:
    for match in EXPRESSION.finditer(text):
        if match[1].strip() == source:
            return match.start()
    return max(text.find(source), 0)


def _strings(value: Any, loc: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(value, str):
        yield loc, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*loc, i))


# ---------------------------------------------------------------- profiles and the project


def _check_profile_templates(project: Project) -> list[Problem]:
    problems: list[Problem] = []
    for loaded in project.profiles.values():
        profile = loaded.profile
        names = {"secrets"}
        if isinstance(profile, ConnectedUserProfile):
            names.add("trigger")
        checker = _ProfileChecker(loaded.doc)
        raw = loaded.doc.data
        for key, value in raw.items():
            scope_names = set(names)
            if key == "headers" and isinstance(profile, OAuth2Profile | SessionProfile):
                scope_names.add("token")
            if key == "refresh" and isinstance(profile, SessionProfile):
                scope_names.add("token")
            checker.check(value, (key,), frozenset(scope_names))
        if isinstance(profile, OAuth2Profile | SessionProfile):
            for name, path in profile.capture.items():
                checker.jsonpath(path, ("capture", name))
        if isinstance(profile, SessionProfile):
            for name in ("token", "expires_in", "expires_at", "refresh_token"):
                checker.jsonpath(getattr(profile, name), (name,))
        for channel in profile.notify:
            if channel not in project.settings.channels:
                checker.problems.append(
                    Problem(
                        loaded.doc.position(("notify",)),
                        f"unknown notification channel '{channel}'",
                        "declare it under channels: in flowrunner.yaml",
                        "channel",
                    )
                )
        problems.extend(checker.problems)
    return problems


class _ProfileChecker:
    def __init__(self, doc: SourceDocument) -> None:
        self.doc = doc
        self.problems: list[Problem] = []

    def check(self, value: Any, loc: tuple[Any, ...], names: frozenset[str]) -> None:
        for sub_loc, text in _strings(value, loc):
            if "${{" not in text:
                continue
            try:
                template = compile_template(text)
            except ExpressionSyntaxError as exc:
                self.problems.append(
                    Problem(
                        self.doc.position(sub_loc),
                        f"invalid expression: {exc.reason}",
                        code="syntax",
                    )
                )
                continue
            for expression in template.expressions:
                for ref in expression.references:
                    if ref.root not in names and ref.root not in GLOBAL_NAMES:
                        suggestion = closest(ref.root, list(names))
                        self.problems.append(
                            Problem(
                                self.doc.position(
                                    sub_loc, offset=_offset_of(text, expression.source)
                                ),
                                f"unknown name '{ref.root}' in ${{{{ {ref} }}}}",
                                f"did you mean '{suggestion}'?"
                                if suggestion
                                else f"names here: {', '.join(sorted(names))}",
                                "unknown_name",
                            )
                        )

    def jsonpath(self, path: str | None, loc: tuple[Any, ...]) -> None:
        if path is None:
            return
        try:
            compile_jsonpath(path)
        except InvalidJsonPath as exc:
            self.problems.append(Problem(self.doc.position(loc), str(exc), code="jsonpath"))


def _check_webhook_paths(project: Project) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, Position] = {}
    for loaded in project.flows.values():
        for i, trigger in enumerate(loaded.flow.triggers):
            webhook = getattr(trigger, "webhook", None)
            if webhook is None:
                continue
            position = loaded.doc.position(("triggers", i, "webhook", "path"))
            if webhook.path in seen:
                problems.append(
                    Problem(
                        position,
                        f"webhook path '{webhook.path}' is already served by {seen[webhook.path]}",
                        "each webhook path belongs to one flow",
                        "duplicate_path",
                    )
                )
            else:
                seen[webhook.path] = position
    return problems


def check_project(project: Project) -> None:
    """Run every cross-file check; flows and profiles with problems leave the runnable set."""
    profile_problems = _check_profile_templates(project)
    bad_profile_files = {p.position.file for p in profile_problems}
    for name, loaded_profile in list(project.profiles.items()):
        if loaded_profile.file in bad_profile_files:
            del project.profiles[name]
            project.broken_profiles.add(name)
    project.problems.extend(profile_problems)
    flow_problems: list[Problem] = []
    for loaded in list(project.flows.values()):
        flow_problems.extend(FlowChecker(project, loaded).check())
    flow_problems.extend(_check_webhook_paths(project))
    bad_files = {p.position.file for p in flow_problems}
    for name, loaded_flow in list(project.flows.items()):
        if loaded_flow.file in bad_files:
            del project.flows[name]
            project.broken_flows.add(name)
    project.problems.extend(flow_problems)
