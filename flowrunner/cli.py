"""The ``flowrunner`` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flowrunner.app import build_runtime, open_database, prune_state
from flowrunner.auth.jwt import user_of_credential
from flowrunner.errors import FlowrunnerError
from flowrunner.loader import Project, find_project_root, load_project
from flowrunner.logs import quiet_third_party_loggers
from flowrunner.model import BearerProfile, OAuth2Profile, SessionProfile
from flowrunner.model.base import Duration
from flowrunner.profile_status import profile_states
from flowrunner.reminders import calendar
from flowrunner.schema import SchemaKind, json_schema
from flowrunner.secrets import MASK, Masker, current_masker
from flowrunner.store.runs import RunRecord, StepRecord
from flowrunner.store.tokens import fingerprint as token_fingerprint

app = typer.Typer(
    help="Run YAML flows of HTTP steps on schedules and webhooks, with credentials kept alive.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
# Piped output (CI logs, grep) gets wide lines instead of an 80-column wrap.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)

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


def _parse_inputs(pairs: list[str]) -> dict[str, str]:
    inputs: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"{pair!r}: write name=value", param_hint="--input")
        key, value = pair.split("=", 1)
        inputs[key.strip()] = value
    return inputs


_STATUS_STYLE = {"succeeded": "green", "failed": "red", "skipped": "dim", "continued": "yellow"}


def _print_step(step: StepRecord) -> None:
    style = _STATUS_STYLE.get(step.status, "white")
    line = f"[{style}]{step.status:>9}[/] {step.path} ({step.kind}, {step.duration_ms:.0f} ms)"
    if step.request:
        line += f"  {escape(step.request['method'])} {escape(step.request['url'])}"
    if step.response and step.response.get("status"):
        line += f" -> {step.response['status']}"
    if step.attempts > 1:
        line += f" after {step.attempts} attempts"
    out.print(line)
    if step.message:
        out.print(f"          {escape(step.message)}")
    if step.error:
        out.print(f"          [red]{escape(step.error)}[/]")


def _print_dry_run(step: StepRecord) -> None:
    if step.request:
        out.print(
            f"[bold]{escape(step.path)}[/]: {escape(step.request['method'])} "
            f"{escape(step.request['url'])}"
        )
        if step.request.get("auth"):
            out.print(f"    (auth profile {escape(step.request['auth'])} applied when sent)")
        for name, value in step.request["headers"].items():
            out.print(f"    {escape(name)}: {escape(str(value))}")
        if step.request.get("body"):
            out.print(f"    {escape(str(step.request['body']))}")
    elif step.message:
        out.print(f"[bold]{escape(step.path)}[/]: {escape(step.message)}")


def _load_for_run(project: Path | None) -> Project:
    loaded = load_project(_project_root(project))
    for problem in loaded.problems:
        err.print(f"warning: {problem.format()}", markup=False)
    return loaded


@app.command()
def run(
    flow: Annotated[str, typer.Argument(help="The flow's name.")],
    inputs: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="An input, as name=value.")
    ] = None,
    body: Annotated[
        Path | None, typer.Option("--body", help="A JSON file used as the webhook body.")
    ] = None,
    user_token: Annotated[
        str | None,
        typer.Option(
            "--user-token",
            envvar="FLOWRUNNER_USER_TOKEN",
            help="The connected user's token (better: the env variable).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the requests, secrets masked; send nothing.")
    ] = False,
    project: ProjectOption = None,
) -> None:
    """Run a flow once, now, printing its steps as they go."""
    loaded = _load_for_run(project)
    trigger: dict[str, Any] = {"kind": "manual"}
    if body is not None:
        try:
            trigger["body"] = json.loads(body.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"cannot read {body}: {exc}", param_hint="--body") from None
        trigger.update(headers={}, query={}, method="POST", path="")
    if user_token:
        trigger.setdefault("headers", {})["authorization"] = f"Bearer {user_token}"
    record = asyncio.run(
        _run_once(loaded, flow, trigger, _parse_inputs(inputs or []), user_token, dry_run)
    )
    if record.status == "succeeded":
        out.print(f"[green]run {record.id} succeeded[/]")
        if record.outputs:
            out.print_json(json.dumps(record.outputs, default=str))
    else:
        out.print(f"[red]run {record.id} failed:[/] {escape(record.error or '')}")
        raise typer.Exit(1)


async def _run_once(
    loaded: Project,
    flow: str,
    trigger: dict[str, Any],
    inputs: dict[str, str],
    user_token: str | None,
    dry_run: bool,
    run_id: str | None = None,
) -> RunRecord:
    # A dry run sends nothing, so it leaves nothing in the history either.
    runtime = build_runtime(loaded.root, project=loaded, keep_history=not dry_run)
    try:
        return await runtime.engine.run(
            flow,
            trigger=trigger,
            inputs=inputs,
            user_token=user_token,
            dry_run=dry_run,
            run_id=run_id,
            on_step=_print_dry_run if dry_run else _print_step,
        )
    except FlowrunnerError as exc:
        err.print(f"[red]{escape(exc.message)}[/]")
        raise typer.Exit(exc.exit_code) from None
    finally:
        await runtime.aclose()


runs_app = typer.Typer(help="Run history.", no_args_is_help=False)
app.add_typer(runs_app, name="runs")


@runs_app.callback(invoke_without_command=True)
def runs_default(ctx: typer.Context, project: ProjectOption = None) -> None:
    """List recent runs (same as 'runs list')."""
    if ctx.invoked_subcommand is None:
        runs_list(project=project)


@runs_app.command("list")
def runs_list(
    flow: Annotated[str | None, typer.Option("--flow", help="Only this flow.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 20,
    project: ProjectOption = None,
) -> None:
    """The most recent runs, newest first."""
    loaded = load_project(_project_root(project))
    database, history = open_database(loaded)
    try:
        records = history.list_runs(flow, limit)
        with_user = any(record.user for record in records)  # a column only when it says something
        columns = ["id", "flow", "status", "started", "duration", *(["user"] if with_user else [])]
        table = Table(*columns, "error", box=None)
        for record in records:
            duration = (
                f"{(record.finished_at - record.started_at).total_seconds():.2f}s"
                if record.finished_at
                else ""
            )
            style = _STATUS_STYLE.get(record.status, "white")
            table.add_row(
                record.id[:8],
                record.flow,
                f"[{style}]{record.status}[/]",
                record.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                duration,
                *([escape(record.user or "")] if with_user else []),
                escape((record.error or "")[:80]),
            )
        out.print(table)
    finally:
        database.close()


@runs_app.command("prune")
def runs_prune(
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            help="Remove runs that started longer ago than this (30d, 12h, ...). "
            "Default: history.keep of flowrunner.yaml.",
        ),
    ] = None,
    project: ProjectOption = None,
) -> None:
    """Remove finished runs (and delivered notifications) older than the history keeps."""
    loaded = load_project(_project_root(project))
    keep = loaded.settings.history.keep
    if older_than is not None:
        try:
            keep = TypeAdapter(Duration).validate_python(older_than)
        except ValidationError:
            err.print(f"--older-than {older_than!r} is not a duration: write e.g. 30d or 12h")
            raise typer.Exit(2) from None
        if keep <= timedelta(0):
            err.print("--older-than must be longer than zero")
            raise typer.Exit(2)
    if keep is None:
        out.print("history.keep is null in flowrunner.yaml: every run is kept (see --older-than)")
        return
    before = datetime.now(UTC) - keep
    database, _ = open_database(loaded)
    try:
        runs, sent = prune_state(database, before)
    finally:
        database.close()
    out.print(
        f"removed {runs} run(s) and {sent} delivered notification(s) from before "
        f"{before:%Y-%m-%d %H:%M} UTC"
    )


def _stored_run(loaded: Project, run_id: str) -> RunRecord:
    database, history = open_database(loaded)
    try:
        record = history.get_run(run_id)
    finally:
        database.close()
    if record is None:
        err.print(f"no run {run_id}")
        raise typer.Exit(1)
    return record


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="A run id (a prefix is enough).")],
    project: ProjectOption = None,
) -> None:
    """Every step of a run: request, response, outputs and timing."""
    record = _stored_run(load_project(_project_root(project)), run_id)
    out.print(f"[bold]run {record.id}[/]  flow {record.flow}  {record.status}")
    out.print(f"started {record.started_at}  finished {record.finished_at}")
    if record.user:
        out.print(f"user: {escape(record.user)}")
    out.print(f"trigger: {escape(json.dumps(record.trigger, default=str))}")
    out.print(f"inputs: {escape(json.dumps(record.inputs, default=str))}")
    if record.error:
        out.print(f"[red]error: {escape(record.error)}[/]")
    for step in record.steps:
        _print_step(step)
        if step.request:
            out.print(f"          request: {escape(json.dumps(step.request, default=str))}")
        if step.response:
            out.print(f"          response: {escape(json.dumps(step.response, default=str))}")
        if step.outputs is not None:
            out.print(f"          outputs: {escape(json.dumps(step.outputs, default=str))}")
    if record.outputs is not None:
        out.print(f"outputs: {escape(json.dumps(record.outputs, default=str))}")


@runs_app.command("rerun")
def runs_rerun(
    run_id: Annotated[str, typer.Argument(help="A run id (a prefix is enough).")],
    user_token: Annotated[
        str | None,
        typer.Option(
            "--user-token",
            envvar="FLOWRUNNER_USER_TOKEN",
            help="The connected user's token: the history never keeps it.",
        ),
    ] = None,
    project: ProjectOption = None,
) -> None:
    """Run a flow again with the same trigger payload and inputs."""
    loaded = _load_for_run(project)
    record = _stored_run(loaded, run_id)
    trigger = dict(record.trigger)
    headers = dict(trigger.get("headers") or {})
    # A masked credential header is not replayed as '***': it would be sent as a token.
    masked = [name for name, value in headers.items() if MASK in str(value)]
    headers = {name: value for name, value in headers.items() if name not in masked}
    if user_token:
        headers["authorization"] = f"Bearer {user_token}"
    if "headers" in trigger or user_token:
        trigger["headers"] = headers
    if "user" in trigger:  # the caller is whoever's token this rerun carries, if anyone
        trigger["user"] = user_of_credential(user_token)
    if masked and not user_token:
        err.print(
            f"note: the original {', '.join(masked)} header(s) were secret and are not "
            "replayed; a connected user's token needs --user-token"
        )
    if MASK in json.dumps(trigger, default=str):
        err.print("note: other masked values in the original trigger are replayed as '***'")
    result = asyncio.run(_run_once(loaded, record.flow, trigger, record.inputs, user_token, False))
    out.print(f"run {result.id} {result.status} (rerun of {record.id})")
    if result.status != "succeeded":
        raise typer.Exit(1)


profiles_app = typer.Typer(help="Auth profiles: expiry, status, tokens.", no_args_is_help=False)
app.add_typer(profiles_app, name="profiles")


def _when(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return ""
    delta = moment - now
    days = delta.total_seconds() / 86400
    if abs(delta.total_seconds()) < 60:
        relative = "now"
    elif days >= 1:
        relative = f"in {days:.0f}d"
    else:
        relative = f"in {delta.total_seconds() / 3600:.1f}h" if delta > timedelta(0) else "passed"
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} ({relative})"


_PROFILE_STYLE = {
    "ok": "green",
    "expiring": "yellow",
    "expired": "red",
    "rejected": "red",
    "needs_login": "red",
    "forbidden": "yellow",
}


@profiles_app.callback(invoke_without_command=True)
def profiles_default(ctx: typer.Context, project: ProjectOption = None) -> None:
    """Show every profile's status and deadlines (same as 'profiles list')."""
    if ctx.invoked_subcommand is None:
        profiles_list(project=project)


@profiles_app.command("list")
def profiles_list(project: ProjectOption = None) -> None:
    """Every profile: kind, status, expiry, refresh-token lapse, next reminder, last use."""
    loaded = _load_for_run(project)
    now = datetime.now(UTC)
    # One moment for the whole table: a reminder due now reads "now", not "passed".
    runtime = build_runtime(loaded.root, project=loaded, keep_history=False, clock=lambda: now)
    try:
        reminders = runtime.reminders
        next_reminders = {d.profile: reminders.next_reminder_at(d) for d in reminders.deadlines()}
        table = Table(
            "profile",
            "kind",
            "status",
            "expires",
            "refresh token lapses",
            "regenerate by",
            "next reminder",
            "last used",
            "last error",
            box=None,
        )
        for state in profile_states(runtime.auth, now):
            style = _PROFILE_STYLE.get(state.status, "white")
            table.add_row(
                state.name,
                state.kind,
                f"[{style}]{state.status}[/]",
                _when(state.expires_at, now),
                _when(state.refresh_lapses_at, now),
                _when(state.regenerate_by, now),
                _when(next_reminders.get(state.name), now),
                f"{state.last_used_at:%Y-%m-%d %H:%M}" if state.last_used_at else "",
                escape((state.last_error or "")[:60]),
            )
        out.print(table)
        failures = runtime.notifier.store.failures()
        if failures:
            out.print(f"\n[red]{len(failures)} notification(s) not delivered yet:[/]")
            for item in failures:
                out.print(
                    f"  {escape(item.subject)} via {escape(item.channel)}: "
                    f"{escape(item.last_error or '')} ({item.attempts} attempt(s), "
                    f"next {item.next_attempt_at:%Y-%m-%d %H:%M})"
                )
    except FlowrunnerError as exc:  # a state database this key cannot decrypt, say
        err.print(f"[red]{escape(exc.message)}[/]")
        raise typer.Exit(exc.exit_code) from None
    finally:
        asyncio.run(runtime.aclose())


@profiles_app.command("remind")
def profiles_remind(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show, send nothing.")] = False,
    project: ProjectOption = None,
) -> None:
    """Send the reminders that are due now (the server does this on its own)."""
    loaded = _load_for_run(project)
    runtime = build_runtime(loaded.root, project=loaded, keep_history=False)

    async def remind() -> None:
        try:
            due = runtime.reminders.due() if dry_run else runtime.reminders.send_due()
            for reminder in due:
                out.print(f"[bold]{escape(reminder.subject)}[/]")
                out.print(escape(reminder.body) + "\n")
            if not due:
                out.print("no reminder is due")
            if not dry_run:
                delivered, failed = await runtime.notifier.deliver_due()
                out.print(f"delivered {delivered}, failed {failed}")
        finally:
            await runtime.aclose()

    asyncio.run(remind())


@profiles_app.command("calendar")
def profiles_calendar(project: ProjectOption = None) -> None:
    """Print every credential deadline as an iCalendar (.ics) file."""
    loaded = _load_for_run(project)
    runtime = build_runtime(loaded.root, project=loaded, keep_history=False)
    try:
        sys.stdout.write(calendar(runtime.reminders.deadlines(), datetime.now(UTC)))
    finally:
        asyncio.run(runtime.aclose())


@profiles_app.command("check")
def profiles_check(
    name: Annotated[str, typer.Argument(help="The profile's name.")],
    project: ProjectOption = None,
) -> None:
    """Obtain or test the profile's credential now."""
    loaded = _load_for_run(project)
    if name not in loaded.profiles:
        err.print(f"no valid auth profile named '{name}'")
        raise typer.Exit(1)
    ok, message = asyncio.run(_check_profile(loaded, name))
    (out if ok else err).print(escape(message))
    if not ok:
        raise typer.Exit(1)


async def _check_profile(loaded: Project, name: str) -> tuple[bool, str]:
    runtime = build_runtime(loaded.root, project=loaded, keep_history=False)
    try:
        profile = loaded.profiles[name].profile
        masker = Masker()
        current_masker.set(masker)  # log lines quoting a token endpoint's answer get masked
        if isinstance(profile, OAuth2Profile | SessionProfile):
            credential = await runtime.auth.credential(name, masker)
            expiry = credential.access_expires_at
            return True, (
                f"{name}: token ok (fingerprint {credential.fingerprint}"
                + (f", expires {expiry:%Y-%m-%d %H:%M} UTC)" if expiry else ")")
            )
        if isinstance(profile, BearerProfile):
            token, expiry = runtime.auth.bearer_token(profile, masker)
            if expiry is not None and expiry <= datetime.now(UTC):
                return False, f"{name}: the token expired on {expiry:%Y-%m-%d %H:%M} UTC"
            return True, (
                f"{name}: token present (fingerprint {token_fingerprint(token)}"
                + (f", expires {expiry:%Y-%m-%d} UTC)" if expiry else ")")
            )
        return True, f"{name}: {profile.kind} profile; its credential is checked when a flow runs"
    except FlowrunnerError as exc:
        return False, exc.message
    finally:
        await runtime.aclose()


@profiles_app.command("set-token")
def profiles_set_token(
    name: Annotated[str, typer.Argument(help="A bearer profile's name.")],
    project: ProjectOption = None,
) -> None:
    """Store a regenerated token, read from standard input (never from the command line)."""
    loaded = _load_for_run(project)
    found = loaded.profiles.get(name)
    if found is None or not isinstance(found.profile, BearerProfile):
        err.print(
            f"'{name}' is not a valid bearer profile; set-token is for tokens that "
            "cannot be refreshed"
        )
        raise typer.Exit(1)
    if sys.stdin.isatty():
        err.print("paste the token, then press Enter:")
    text = sys.stdin.readline().strip() if sys.stdin.isatty() else sys.stdin.read().strip()
    token = _token_from_text(text)
    if not token:
        err.print("no token on standard input")
        raise typer.Exit(1)
    runtime = build_runtime(loaded.root, project=loaded, keep_history=False)
    try:
        credential = runtime.auth.set_bearer_token(found.profile, token)
    finally:
        asyncio.run(runtime.aclose())
    expiry = credential.access_expires_at
    out.print(
        f"stored a new token for {name} (fingerprint {credential.fingerprint}"
        + (f", expires {expiry:%Y-%m-%d} UTC)" if expiry else ")")
        + "; its status is reset"
    )


def _token_from_text(text: str) -> str:
    """A raw token, or JSON with a 'token' field (as token-issuing admin APIs answer)."""
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return text
        if isinstance(data, dict) and isinstance(data.get("token"), str):
            return str(data["token"])
    return text


@app.command()
def serve(
    host: Annotated[str | None, typer.Option("--host", help="Default: 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Default: 8800.")] = None,
    log_format: Annotated[str, typer.Option("--log-format", help="json or text.")] = "json",
    with_sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox",
            help="Also start the sandbox API on 127.0.0.1:8900 and use "
            "its demo credentials (.env.example) for secrets not set otherwise.",
        ),
    ] = False,
    project: ProjectOption = None,
) -> None:
    """Run the project: schedules, webhooks at /hooks/<path>, run status, live reload."""
    from flowrunner.logs import configure_logging
    from flowrunner.server import serve as serve_project

    configure_logging(json_lines=log_format == "json")
    root = _project_root(project)
    try:
        secrets = None
        if with_sandbox:
            from flowrunner.demo import connect_to_sandbox, sandbox_secrets, start_sandbox

            start_sandbox()
            secrets = sandbox_secrets(root)
            connected = connect_to_sandbox(root, secrets)
            err.print(
                "sandbox on http://127.0.0.1:8900 (admin view: /_admin/stats); "
                f"machine-user token stored for: {', '.join(connected) or 'none'}"
            )
        serve_project(root, host, port, secrets)
    except FlowrunnerError as exc:
        err.print(f"[red]{escape(exc.message)}[/]")
        raise typer.Exit(exc.exit_code) from None


@app.command()
def sandbox(
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = 8900,
) -> None:
    """Serve a local API that behaves like the seed systems, for the example flows."""
    from flowrunner.sandbox import serve_sandbox

    err.print(f"sandbox on http://127.0.0.1:{port} (admin view: /_admin/stats)")
    serve_sandbox(port=port)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party_loggers()
    app()
