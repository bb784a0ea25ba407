"""Validation benchmark: how long ``load_project`` takes on a large generated project.

    python bench/validate.py [--flows 1000 5000] [--repeat 3] [--seed 7] [--keep]

Goal: 1,000 flows of 10 steps validated in under 2 s, 5,000 in under 10 s (linear).
Baseline, measured in the same run on the same files: reading and parsing every file
with ``yaml.load(text, Loader=yaml.CSafeLoader)``, the floor any YAML loader pays.
Each measurement runs in a fresh process (the loader caches compiled expressions and
JSONPaths by text), and the figure reported is the median of ``--repeat`` runs.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    MeasurementFailed,
    emit,
    median,
    profile_report,
    run_child,
    table,
    warm_page_cache,
)

SCRIPT = Path(__file__).resolve()
EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
STEPS_PER_FLOW = 10
# The requirement: seconds allowed for N flows. Other sizes are held to the same rate.
GOALS = {1000: 2.0, 5000: 10.0}
GOAL_PER_FLOW = 0.002


# ---------------------------------------------------------------- the generated project

PROFILES: dict[str, str] = {
    "erp-service-account": """\
name: erp-service-account
description: ERP service account (OAuth2 password grant)
kind: oauth2
grant: password
base_url: https://erp.acme.example/api/v2
token_url: https://erp.acme.example/oauth/v2/token
body_format: json
client_id: ${{ secrets.ERP_CLIENT_ID }}
client_secret: ${{ secrets.ERP_CLIENT_SECRET }}
username: ${{ secrets.ERP_USERNAME }}
password: ${{ secrets.ERP_PASSWORD }}
refresh_token_lifetime: 14d
keep_alive: true
owner: it-admins@acme.example
""",
    "crm-integration": """\
name: crm-integration
description: CRM integration client (OAuth2 client credentials)
kind: oauth2
grant: client_credentials
base_url: https://crm.acme.example/rest/v1
token_url: https://login.crm.acme.example/oauth/token
client_id: ${{ secrets.CRM_CLIENT_ID }}
client_secret: ${{ secrets.CRM_CLIENT_SECRET }}
scope: contacts.read contacts.write
owner: sales-ops@acme.example
""",
    "board-machine-user": """\
name: board-machine-user
description: Board machine user; an administrator regenerates its JWT every year
kind: bearer
token: ${{ secrets.BOARD_TOKEN }}
base_url: https://acme.board.example/s/api
allowed_hosts: [acme.board.example]
regenerate_every: 365d
remind_before: [30d, 14d, 7d, 1d]
owner: it-admins@acme.example
""",
    "shop-keys": """\
name: shop-keys
description: Web shop REST API keys, sent as query parameters
kind: api_key
base_url: https://shop.acme.example/wp-json/wc/v3
query:
  consumer_key: ${{ secrets.SHOP_KEY }}
  consumer_secret: ${{ secrets.SHOP_SECRET }}
""",
    "ledger-api-key": """\
name: ledger-api-key
description: Ledger API key in a header
kind: api_key
base_url: https://ledger.acme.example/v2
headers:
  X-API-Key: ${{ secrets.LEDGER_API_KEY }}
""",
}
SOURCES = ("erp-service-account", "crm-integration", "shop-keys", "ledger-api-key")
TARGETS = ("board-machine-user", "ledger-api-key", "crm-integration")

NOUNS = (
    "assets",
    "orders",
    "invoices",
    "customers",
    "contacts",
    "tickets",
    "work_orders",
    "products",
    "suppliers",
    "projects",
    "shipments",
    "timesheets",
)
VERBS = ("fetch", "list", "load", "get", "pull", "read", "query", "collect")
TARGET_VERBS = ("push", "post", "create", "send", "upsert", "write", "sync")
QUALIFIERS = ("eu", "us", "no", "fr", "new", "open", "late", "hq", "main", "all", "v2")
SCOPE_INPUTS = ("site", "region", "warehouse", "company", "tenant", "department", "store")
SINCE_INPUTS = ("since", "updated_after", "from_date", "changed_since", "start")
LIMIT_INPUTS = ("limit", "max_items", "batch", "top")
BOARD_VARS = ("board_id", "board", "target_board", "room_id")
SIZE_VARS = ("page_size", "per_page", "batch_size", "chunk")
LANE_VARS = ("lane", "column", "swimlane", "status_column")
TIMEZONES = (
    "Europe/Paris",
    "Europe/Oslo",
    "Europe/Berlin",
    "Europe/London",
    "America/New_York",
    "America/Chicago",
    "Asia/Tokyo",
    "Australia/Sydney",
    "UTC",
)
DAYS = ("MON-FRI", "*", "1-5", "MON,WED,FRI", "SAT", "TUE-THU")
SITES = ("HQ", "OSLO", "LYON", "BERGEN", "PARIS", "NANTES", "TRONDHEIM", "LILLE")


class _Ids:
    """Step ids for one flow: readable, unique in the flow, varied across flows."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def make(self, *words: str) -> str:
        base = "_".join(words)
        if self.rng.random() < 0.6:
            base += "_" + self.rng.choice(QUALIFIERS)
        if self.rng.random() < 0.5:
            base += str(self.rng.randint(1, 99))
        candidate, n = base, 2
        while candidate in self.used:
            candidate, n = f"{base}_{n}", n + 1
        self.used.add(candidate)
        return candidate


def flow_yaml(index: int, seed: int) -> str:
    """One valid flow of exactly ten steps, different from every other flow."""
    rng = random.Random(seed * 1_000_003 + index)
    ids = _Ids(rng)
    noun, detail_noun = rng.sample(NOUNS, 2)
    title_noun = noun.rstrip("s").replace("_", " ").capitalize()
    source, target = rng.choice(SOURCES), rng.choice(TARGETS)
    scope_in, since_in, limit_in = (
        rng.choice(SCOPE_INPUTS),
        rng.choice(SINCE_INPUTS),
        rng.choice(LIMIT_INPUTS),
    )
    board_var, size_var, lane_var = (
        rng.choice(BOARD_VARS),
        rng.choice(SIZE_VARS),
        rng.choice(LANE_VARS),
    )
    name = f"{source.split('-')[0]}-{noun.replace('_', '-')}-to-{target.split('-')[0]}-{index:05d}"
    threshold = rng.randint(50, 5000)

    s_list = ids.make(rng.choice(VERBS), noun)
    s_detail = ids.make(rng.choice(VERBS), detail_noun)
    s_totals = ids.make("totals")
    s_each = ids.make("each", noun.rstrip("s"))
    s_card = ids.make(rng.choice(TARGET_VERBS), "card")
    s_branch = ids.make(rng.choice(("route", "by_mode", "branch", "mode")))
    s_inner_a = ids.make(rng.choice(TARGET_VERBS), "state")
    s_inner_b = ids.make("note", rng.choice(("delta", "skip", "failure")))
    s_report = ids.make(rng.choice(("report", "summary", "record_run", "audit")))
    s_log = ids.make(rng.choice(("done", "log_summary", "final_log", "trace")))

    out: list[str] = [
        f"name: {name}",
        f"description: Copy {noun.replace('_', ' ')} from {source} to {target} (#{index})",
        "triggers:",
        f'  - schedule: {{cron: "{_cron(rng)}", timezone: {rng.choice(TIMEZONES)}}}',
    ]
    if rng.random() < 0.3:
        out.append(f"  - schedule: {{every: {rng.choice((5, 10, 15, 30, 45))}m}}")
    if rng.random() < 0.4:
        secret = f"HOOK_{noun.upper()}_{index:05d}_SECRET"
        out += [
            "  - webhook:",
            f"      path: {noun.replace('_', '-')}/{rng.choice(VERBS)}-{index:05d}",
            "      methods: [POST]",
            '      auth: {hmac: {secret: "${{ secrets.' + secret + ' }}", '
            f"header: X-Signature-{rng.randint(1, 9)}, algorithm: sha256}}}}",
            f"      respond: {rng.choice(('wait', 'immediate'))}",
            f"      timeout: {rng.randint(10, 60)}s",
            "      dedupe: {key: \"${{ trigger.headers['x-delivery-id'] }}\", for: "
            f"{rng.choice(('1h', '12h', '24h'))}}}",
        ]
    out += [
        "inputs:",
        f"  {scope_in}: {{type: string, default: {rng.choice(SITES)}}}",
        f"  {since_in}: {{type: string, default: "
        f'"202{rng.randint(0, 5)}-0{rng.randint(1, 9)}-01"}}',
        f"  {limit_in}: {{type: integer, default: {rng.randint(10, 500)}}}",
        "vars:",
        f"  {board_var}: B-{rng.randint(1000, 99999)}",
        f"  {size_var}: {rng.choice((25, 50, 100, 200))}",
        f'  {lane_var}: "{rng.choice(("Backlog", "To do", "Incoming", "Review"))}"',
        f"concurrency: {{limit: {rng.randint(1, 3)}, when_busy: "
        f"{rng.choice(('queue', 'skip', 'fail'))}}}",
        f"timeout: {rng.randint(5, 60)}m",
        "steps:",
    ]

    # 1. the list call: query from inputs and vars, pagination, outputs, sometimes retry
    out += [
        f"  - id: {s_list}",
        "    http:",
        "      method: GET",
        f"      url: /{noun.replace('_', '-')}",
        f"      auth: {source}",
        "      query:",
        f'        {scope_in}: "${{{{ inputs.{scope_in} }}}}"',
        f"        updated_since: ${{{{ inputs.{since_in} }}}}",
        f'        per_page: "${{{{ vars.{size_var} }}}}"',
        f"        status: {rng.choice(('open', 'active', 'pending', 'approved'))}",
    ]
    if rng.random() < 0.35:
        out.append("      " + _paginate(rng))
    out += [
        "    outputs:",
        '      ids: "$.data[*].id"',
        f'      total: "$.meta.{rng.choice(("total", "count", "total_count"))}"',
        f'      names: "$.data[*].{rng.choice(("name", "title", "label"))}"',
    ]
    if rng.random() < 0.3:
        out.append(
            f"    retry: {{attempts: {rng.randint(2, 6)}, backoff: exponential, "
            f"delay: {rng.randint(1, 5)}s, on: [429, 5xx, timeout]}}"
        )

    # 2. a detail call on the first item
    cond = f"steps.{s_list}.outputs.ids | length > 0"
    out += [
        f"  - id: {s_detail}",
        f"    if: ${{{{ {cond} }}}}" if rng.random() < 0.5 else f"    if: {cond}",
        "    http:",
        f"      url: /{detail_noun.replace('_', '-')}/"
        f"${{{{ steps.{s_list}.outputs.ids | first }}}}",
        f"      auth: {source}",
        f'      query: {{expand: "{rng.choice(("owner", "site", "owner,site"))}", '
        f'{limit_in}: "${{{{ inputs.{limit_in} }}}}"}}',
        f"    timeout: {rng.randint(5, 30)}s",
        "    outputs:",
        f"      owner: $.{rng.choice(('owner', 'responsible', 'manager'))}.email",
        f"      code: $.{rng.choice(('site', 'location', 'unit'))}.code",
    ]

    # 3. set: counts and a mode computed from earlier outputs
    out += [
        f"  - id: {s_totals}",
        "    set:",
        f"      count: ${{{{ steps.{s_list}.outputs.ids | length }}}}",
        f"      mode: ${{{{ 'full' if steps.{s_list}.outputs.total > {threshold} else 'delta' }}}}",
        f"      owner: ${{{{ steps.{s_detail}.outputs.owner | default('ops@acme.example') }}}}",
        f'      label: "{title_noun} sync ${{{{ inputs.{scope_in} }}}} '
        f"${{{{ now() | datetime('%Y-%m-%d') }}}}\"",
        "      fired: ${{ trigger.fired_at }}",
    ]

    # 4-5. for_each over the ids, a nested POST per item
    out += [
        f"  - id: {s_each}",
        f"    for_each: ${{{{ steps.{s_list}.outputs.ids }}}}",
        f"    concurrency: {rng.randint(1, 10)}",
        "    steps:",
        f"      - id: {s_card}",
        "        http:",
        "          method: POST",
        f"          url: /boards/${{{{ vars.{board_var} }}}}/cards",
        f"          auth: {target}",
        "          json:",
        f'            title: "{title_noun} ${{{{ item }}}}"',
        "            position: ${{ index }}",
        f'            {scope_in}: "${{{{ inputs.{scope_in} }}}}"',
        f'            owner: "${{{{ steps.{s_totals}.outputs.owner }}}}"',
        f'            column: "${{{{ vars.{lane_var} }}}}"',
        f'            tags: [sync, "${{{{ steps.{s_totals}.outputs.mode }}}}", '
        f'"{rng.choice(QUALIFIERS)}"]',
        f"          expect: [{rng.choice(('201', '200, 201', '2xx'))}]",
    ]
    if rng.random() < 0.5:
        out.append(
            f"        retry: {{attempts: {rng.randint(2, 5)}, backoff: exponential, "
            f"delay: {rng.randint(1, 3)}s, max_delay: {rng.randint(30, 120)}s, "
            "on: [429, 5xx, timeout]}"
        )

    # 6-8. a switch on the mode, or a group with a catch
    if rng.random() < 0.5:
        out += [
            f"  - id: {s_branch}",
            f"    switch: ${{{{ steps.{s_totals}.outputs.mode }}}}",
            "    cases:",
            "      full:",
            f"        - id: {s_inner_a}",
            "          http:",
            "            method: PUT",
            f"            url: /{noun.replace('_', '-')}/sync-state",
            f"            auth: {source}",
            f'            json: {{count: "${{{{ steps.{s_totals}.outputs.count }}}}", '
            f'at: "${{{{ trigger.fired_at }}}}", names: "${{{{ steps.{s_list}.outputs.names '
            "| join(', ') }}\"}",
            "      delta:",
            f"        - id: {s_inner_b}",
            f'          log: "Delta sync of ${{{{ steps.{s_totals}.outputs.count }}}} '
            f'{noun.replace("_", " ")}"',
            "          level: debug",
        ]
    else:
        out += [
            f"  - id: {s_branch}",
            "    group:",
            f"      - id: {s_inner_a}",
            "        http:",
            "          method: PATCH",
            f"          url: https://{rng.choice(('erp', 'crm', 'ledger'))}.acme.example/"
            f"hooks/{noun.replace('_', '-')}/{rng.randint(1, 999)}",
            f'          json: {{count: "${{{{ steps.{s_totals}.outputs.count }}}}", '
            f'label: "${{{{ steps.{s_totals}.outputs.label }}}}"}}',
            "          expect: [200, 204]",
            "    catch:",
            f"      - id: {s_inner_b}",
            f'        log: "Could not record {noun.replace("_", " ")}: '
            f'${{{{ error.message | default(error) }}}}"',
            "        level: warning",
        ]

    # 9. a summary POST using several earlier steps
    out += [
        f"  - id: {s_report}",
        "    http:",
        "      method: POST",
        f"      url: /runs/{rng.choice(('sync', 'import', 'export'))}-{rng.randint(1, 99)}",
        f"      auth: {target}",
        "      json:",
        '        run: "${{ run.id }}"',
        '        flow: "${{ run.flow }}"',
        f"        total: ${{{{ steps.{s_totals}.outputs.count }}}}",
        f"        cards: ${{{{ steps.{s_each}.outputs | length }}}}",
        f"        first: ${{{{ steps.{s_list}.outputs.names | first | default('none') }}}}",
        f"        status: ${{{{ steps.{s_detail}.status }}}}",
        "    outputs:",
        f"      report_id: $.{rng.choice(('id', 'data.id', 'report.id'))}",
        "    on_error: continue",
    ]

    # 10. a log line mixing text and expressions
    out += [
        f"  - id: {s_log}",
        f'    log: "Synced ${{{{ steps.{s_totals}.outputs.count }}}} {noun.replace("_", " ")} '
        f"for ${{{{ inputs.{scope_in} }}}} since ${{{{ inputs.{since_in} }}}} "
        f"(report ${{{{ steps.{s_report}.outputs.report_id }}}}, mode "
        f'${{{{ steps.{s_totals}.outputs.mode | upper }}}})"',
    ]
    assert len(ids.used) == STEPS_PER_FLOW
    return "\n".join(out) + "\n"


def _cron(rng: random.Random) -> str:
    if rng.random() < 0.25:
        every = rng.choice((5, 10, 15, 20, 30))
        return f"*/{every} {rng.randint(5, 8)}-{rng.randint(17, 21)} * * MON-FRI"
    return f"{rng.randint(0, 59)} {rng.randint(0, 23)} * * {rng.choice(DAYS)}"


def _paginate(rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        return (
            f'paginate: {{next_url: "$.links.next", items: "$.data[*]", '
            f"max_pages: {rng.randint(5, 100)}}}"
        )
    if form == 1:
        return (
            f'paginate: {{next_cursor: {{path: "$.meta.cursor", param: cursor}}, '
            f'items: "$.data[*]", max_pages: {rng.randint(5, 100)}}}'
        )
    return (
        f'paginate: {{page: {{param: page, start: 1}}, items: "$.data[*]", '
        f'stop: "page > {rng.randint(5, 50)}"}}'
    )


def generate_project(root: Path, flows: int, seed: int) -> list[Path]:
    """Write the auth profiles and ``flows`` flow files; return every file written."""
    written: list[Path] = []
    (root / "auth_profiles").mkdir(parents=True)
    (root / "flows").mkdir()
    for name, text in PROFILES.items():
        path = root / "auth_profiles" / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    for index in range(1, flows + 1):
        path = root / "flows" / f"flow-{index:05d}.yaml"
        path.write_text(flow_yaml(index, seed), encoding="utf-8")
        written.append(path)
    return written


def project_yaml_files(root: Path) -> list[Path]:
    return sorted(
        p for d in ("auth_profiles", "flows") for p in (root / d).rglob("*.yaml") if p.is_file()
    )


# ---------------------------------------------------------------- in the measuring process


def measure(root: Path, mode: str, profile: bool) -> None:
    """Runs in a fresh process: time one load, print the result as JSON."""
    started = time.perf_counter()
    if mode == "baseline":
        import yaml

        loader: Any = yaml.CSafeLoader
        import_seconds = time.perf_counter() - started
        start = time.perf_counter()
        documents = [
            yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - CSafeLoader
            for path in project_yaml_files(root)
        ]
        seconds = time.perf_counter() - start
        assert all(isinstance(d, dict) for d in documents)
        emit({"seconds": seconds, "import_seconds": import_seconds, "files": len(documents)})
        return

    from flowrunner.loader import load_project

    import_seconds = time.perf_counter() - started
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    project = load_project(root)
    seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        print(profile_report(profiler))
    problems = [str(p) for p in project.problems]
    if problems:
        print(f"{len(problems)} problems; the first ones:", file=sys.stderr)
        for problem in problems[:10]:
            print(f"  {problem}", file=sys.stderr)
    emit(
        {
            "seconds": seconds,
            "import_seconds": import_seconds,
            "flows": len(project.flows),
            "profiles": len(project.profiles),
            "problems": len(problems),
            "first_problems": problems[:10],
        }
    )


# ---------------------------------------------------------------- the parent process


def _measure_once(root: Path, mode: str, profile: bool = False) -> tuple[dict[str, Any], str]:
    args = ["--measure", str(root), "--mode", mode]
    if profile:
        args.append("--profile")
    return run_child(SCRIPT, args)


def _goal(n: int) -> tuple[float, str]:
    if n in GOALS:
        return GOALS[n], f"< {GOALS[n]:g} s"
    return n * GOAL_PER_FLOW, f"< {n * GOAL_PER_FLOW:g} s (scaled)"


def run(flow_counts: Sequence[int], repeat: int, seed: int, keep: bool, profile_n: int) -> int:
    print(
        f"validation benchmark: {', '.join(map(str, flow_counts))} flows of "
        f"{STEPS_PER_FLOW} steps, median of {repeat} fresh-process runs, seed {seed}"
    )
    print(f"python {sys.version.split()[0]} on {sys.platform}; {_cpu_note()}")
    workdir = Path(tempfile.mkdtemp(prefix="flowrunner-bench-validate-"))
    results: list[dict[str, Any]] = []
    try:
        roots: dict[int, Path] = {}
        for n in flow_counts:
            start = time.perf_counter()
            root = workdir / f"project-{n}"
            files = generate_project(root, n, seed)
            size = sum(p.stat().st_size for p in files)
            total, distinct = _expression_counts(files)
            print(
                f"generated {n} flows + {len(PROFILES)} profiles in {root} "
                f"({size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s); "
                f"{total} ${{{{ }}}} expressions, {distinct} distinct texts"
            )
            warm_page_cache(files)
            roots[n] = root
        for n in flow_counts:
            flowrunner_runs: list[float] = []
            baseline_runs: list[float] = []
            imports: list[float] = []
            for _ in range(repeat):
                # Interleaved, so that a noisy spell on a shared machine hits both sides.
                base, _text = _measure_once(roots[n], "baseline")
                baseline_runs.append(base["seconds"])
                got, _text = _measure_once(roots[n], "flowrunner")
                if got["problems"] or got["flows"] != n:
                    print(
                        f"\nINVALID: {got['problems']} problems and {got['flows']} of {n} "
                        "flows loaded; the first problems:"
                    )
                    for problem in got["first_problems"]:
                        print(f"  {problem}")
                    return 1
                flowrunner_runs.append(got["seconds"])
                imports.append(got["import_seconds"])
            results.append(
                {
                    "n": n,
                    "flowrunner": median(flowrunner_runs),
                    "baseline": median(baseline_runs),
                    "runs": flowrunner_runs,
                    "baseline_runs": baseline_runs,
                    "import": median(imports),
                }
            )
            print(
                f"  N={n}: flowrunner runs {_fmt_runs(flowrunner_runs)} s, "
                f"baseline runs {_fmt_runs(baseline_runs)} s"
            )
        _print_results(results)
        if profile_n:
            _print_profile(workdir, profile_n, seed, roots)
    except MeasurementFailed as exc:
        print(f"measurement failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if keep:
            print(f"\nkept the generated projects in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _expression_counts(files: Sequence[Path]) -> tuple[int, int]:
    """How many ``${{ }}`` expressions the files hold, and how many distinct texts.

    The loader compiles each distinct text once per process, so the distinct count is
    what it really pays for; it grows a little slower than N, as in real projects.
    """
    found = [
        match[1].strip()
        for path in files
        for match in EXPRESSION.finditer(path.read_text(encoding="utf-8"))
    ]
    return len(found), len(set(found))


def _fmt_runs(runs: Sequence[float]) -> str:
    return "[" + ", ".join(f"{r:.3f}" for r in runs) + "]"


def _cpu_note() -> str:
    import os

    return f"{os.cpu_count()} CPUs (shared machine: figures are noisy, medians help)"


def _print_results(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        n, fr, base = r["n"], r["flowrunner"], r["baseline"]
        goal, goal_text = _goal(n)
        rows.append(
            (
                str(n),
                f"{fr:.3f}",
                f"{base:.3f}",
                f"{fr / base:.1f}x",
                f"{n / fr:,.0f}",
                f"{1000 * fr / n:.3f}",
                goal_text,
                "yes" if fr < goal else "NO",
            )
        )
    print()
    print(
        table(
            (
                "flows",
                "flowrunner s",
                "baseline s",
                "ratio",
                "flows/s",
                "ms/flow",
                "goal",
                "met",
            ),
            rows,
        )
    )
    print(
        "ratio = flowrunner / baseline (yaml.load with CSafeLoader on the same files, "
        "same run); lower is better"
    )
    imports = ", ".join(f"{r['import']:.2f} s" for r in results)
    print(f"(not included above: importing flowrunner.loader takes {imports} per process)")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        per_small = small["flowrunner"] / small["n"]
        per_large = large["flowrunner"] / large["n"]
        base_small = small["baseline"] / small["n"]
        base_large = large["baseline"] / large["n"]
        print(
            f"\nlinearity: per-flow cost {1000 * per_small:.3f} ms at N={small['n']}, "
            f"{1000 * per_large:.3f} ms at N={large['n']}: ratio {per_large / per_small:.2f} "
            f"(1.00 is perfectly linear; the baseline's own ratio, i.e. the noise floor, "
            f"is {base_large / base_small:.2f})"
        )


def _print_profile(workdir: Path, n: int, seed: int, roots: dict[int, Path]) -> None:
    root = roots.get(n)
    if root is None:
        root = workdir / f"project-{n}"
        warm_page_cache(generate_project(root, n, seed))
    result, text = _measure_once(root, "flowrunner", profile=True)
    print(f"\nprofile of load_project for N={n} (one separate run, {result['seconds']:.3f} s):")
    print(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, nargs="+", default=[1000, 5000], metavar="N")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated flows")
    parser.add_argument("--keep", action="store_true", help="keep the generated projects")
    parser.add_argument(
        "--profile-flows",
        type=int,
        default=1000,
        metavar="N",
        help="profile one load of N flows (0: no profile)",
    )
    # Internal: one measurement in this (fresh) process.
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("flowrunner", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        measure(args.measure, args.mode or "flowrunner", args.profile)
        return 0
    if args.repeat < 1 or any(n < 1 for n in args.flows):
        parser.error("--flows and --repeat must be positive")
    return run(args.flows, args.repeat, args.seed, args.keep, args.profile_flows)


if __name__ == "__main__":
    sys.exit(main())
