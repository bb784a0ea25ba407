"""The http step end to end: a YAML flow, the engine, a real server, and back into outputs."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from upstream_server import Upstream

from flowrunner import __version__
from flowrunner.app import Runtime
from flowrunner.store.runs import RunRecord

ProjectWriter = Callable[..., Path]
RuntimeFactory = Callable[..., Runtime]


async def run_flow(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    flow: str,
    *,
    profiles: dict[str, str] | None = None,
    inputs: dict[str, Any] | None = None,
    **tokens: str,
) -> RunRecord:
    root = write_project({"f": flow}, profiles, **tokens)
    runtime = open_runtime(root)
    return await runtime.engine.run(
        "f", inputs=inputs or {}, trigger={}, user_token=None, dry_run=False
    )


def outputs_of(record: RunRecord) -> Any:
    assert record.status == "succeeded", record.error
    return record.outputs


async def test_query_and_headers_arrive_as_written(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """Rendered query parameters (added to the URL's own; a list repeats the name) and
    headers reach the server."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        inputs:
          who: {type: string}
          team: {type: string}
        steps:
          - id: call
            http:
              url: @BASE@/echo?fixed=yes&n=1
              query: {key: @KEY@, who: "${{ inputs.who }}", tags: [a, b], n: 3}
              headers: {X-Team: "team ${{ inputs.team }}", X-Flag: "${{ true }}"}
        """,
        inputs={"who": "Zoé & co", "team": "blue/42"},
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    seen = upstream.state.requests(key)
    assert len(seen) == 1
    body = record.steps[0].response
    assert body is not None
    echoed = body["body"]
    assert echoed["method"] == "GET"
    assert echoed["query"] == {
        "fixed": ["yes"],  # the URL's own query stays; `query` adds to it and wins on a clash
        "n": ["3"],
        "key": [key],
        "who": ["Zoé & co"],
        "tags": ["a", "b"],
    }
    assert echoed["headers"]["x-team"] == "team blue/42"
    assert echoed["headers"]["x-flag"] == "true"
    assert echoed["headers"]["user-agent"] == f"flowrunner/{__version__}"


async def test_non_ascii_header_fails_the_step_clearly(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """A header value with non-ASCII text fails the step with a hint, before sending."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: call
            http:
              url: @BASE@/echo?key=@KEY@
              headers: {X-Who: "Zoé"}
        """,
        KEY=key,
    )
    assert record.status == "failed"
    assert record.error == (
        "step call: header 'X-Who' has non-ASCII characters, which HTTP headers cannot carry; "
        "encode the value (with the urlencode or b64encode filter)"
    )
    assert upstream.state.count(key) == 0


async def test_json_body_is_compact_utf8_json(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """The body is sent as httpx sends json=: compact, non-ASCII characters as UTF-8, an
    integer beyond 64 bits whole."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: post
            http:
              method: post
              url: @BASE@/echo
              json: {name: "Zoë", id: 123456789012345678901234567890, tags: [a, 1]}
            outputs:
              raw: $.body
        """,
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].outputs == {
        "raw": '{"name":"Zoë","id":123456789012345678901234567890,"tags":["a",1]}'
    }


async def test_json_body_is_sent_as_json(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A `json:` body keeps native types from single expressions and sets the content type."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        inputs:
          count: {type: integer}
        steps:
          - id: post
            http:
              method: post
              url: @BASE@/echo
              json:
                title: "Asset ${{ inputs.count }}"
                count: ${{ inputs.count }}
                nested: {ok: true, list: [1, "two", null]}
            outputs:
              sent: $.json
              content_type: $.headers['content-type']
        """,
        inputs={"count": "7"},
    )
    outputs = record.steps[0].outputs
    assert record.status == "succeeded", record.error
    assert outputs == {
        "sent": {"title": "Asset 7", "count": 7, "nested": {"ok": True, "list": [1, "two", None]}},
        "content_type": "application/json",
    }


async def test_form_body_is_url_encoded(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A `form:` body is sent url-encoded, special characters intact."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: post
            http:
              method: POST
              url: @BASE@/echo
              form: {grant_type: password, note: "a b&c=d/é", n: 5}
            outputs:
              form: $.form
              content_type: $.headers['content-type']
        """,
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].outputs == {
        "form": {"grant_type": "password", "note": "a b&c=d/é", "n": "5"},
        "content_type": "application/x-www-form-urlencoded",
    }


async def test_raw_body_is_sent_verbatim(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A `body:` string is sent as it renders, with the content type the step sets."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: put
            http:
              method: PUT
              url: @BASE@/echo
              headers: {Content-Type: text/csv}
              body: "id;name\\n1;${{ 'x' * 3 }}"
            outputs:
              body: $.body
              method: $.method
              content_type: $.headers['content-type']
        """,
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].outputs == {
        "body": "id;name\n1;xxx",
        "method": "PUT",
        "content_type": "text/csv",
    }


async def test_expect_accepts_listed_statuses_and_classes(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """`expect` accepts an exact status (201) and a class (4xx) as success."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: create
            http:
              method: POST
              url: @BASE@/create
              json: {name: widget}
              expect: [201]
            outputs: {id: $.id}
          - id: missing
            http:
              url: @BASE@/echo?status=404
              expect: [200, 4xx]
          - id: accepted
            http: {url: "@BASE@/echo?status=202"}
        outputs:
          id: ${{ steps.create.outputs.id }}
          statuses: ${{ [steps.create.status, steps.missing.status, steps.accepted.status] }}
        """,
    )
    assert outputs_of(record) == {"id": 42, "statuses": [201, 404, 202]}


async def test_unexpected_status_fails_with_status_and_excerpt(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A status outside `expect` fails the run; the message names it and quotes the body."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: create
            http:
              method: POST
              url: @BASE@/create
              json: {name: widget}
              expect: [200]
          - id: never
            log: not reached
        """,
    )
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.startswith("step create: POST http://127.0.0.1:")
    assert "answered 201, expected 200" in record.error
    assert '"name": "widget"' in record.error  # an excerpt of the body
    assert [s.path for s in record.steps] == ["create"]
    step = record.steps[0]
    assert step.status == "failed"
    assert step.response is not None and step.response["status"] == 201


async def test_a_url_already_encoded_is_sent_as_written(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """The query of a URL written percent-encoded (a signed URL from an earlier step, say)
    reaches the server as written, %2F included, with the step's `query` replacing a name
    in place and adding the others; a URL written with a space is still encoded."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: signed
            http: {url: "@BASE@/echo?path=a%2Fb&sig=k%3D%3D&x=1"}
            outputs: {raw: $.raw_query}
          - id: merged
            http:
              url: "@BASE@/echo?path=a%2Fb&sig=k%3D%3D&x=1"
              query: {x: "2", extra: "é"}
            outputs: {raw: $.raw_query}
          - id: spaced
            http: {url: "@BASE@/echo?q=a b"}
            outputs: {q: "$.query.q[0]"}
        """,
    )
    assert record.status == "succeeded", record.error
    outputs = {s.path: s.outputs for s in record.steps}
    assert outputs["signed"] == {"raw": "path=a%2Fb&sig=k%3D%3D&x=1"}
    assert outputs["merged"] == {"raw": "path=a%2Fb&sig=k%3D%3D&x=2&extra=%C3%A9"}
    assert outputs["spaced"] == {"q": "a b"}


async def test_relative_url_joins_the_profile_base_url(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, monkeypatch: Any
) -> None:
    """A relative URL is joined to the auth profile's base_url and carries its credential."""
    monkeypatch.setenv("SHOP_TOKEN", "tok-relative-123")
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: call
            http:
              url: v1/../echo
              auth: shop
              query: {via: relative}
            outputs:
              path: $.path
              authorization: $.headers.authorization
              via: $.query.via[0]
        """,
        profiles={
            "shop": """
            name: shop
            kind: bearer
            base_url: @BASE@/
            token: ${{ secrets.SHOP_TOKEN }}
            """
        },
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].request is not None
    assert record.steps[0].request["headers"]["authorization"] == "***"
    assert record.steps[0].outputs == {
        "path": "/echo",
        "authorization": "Bearer ***",  # the echoed token is masked in the history too
        "via": "relative",
    }


async def test_outputs_single_list_and_missing_paths(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """JSONPath outputs: one value, a list, and paths matching nothing give None and []."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: page
            http: {url: "@BASE@/pages/next?page=0"}
            outputs:
              first: $.data[0].name
              ids: $.data[*].id
              nothing: $.no.such.field
              none_listed: $.data[*].missing
          - id: check
            set:
              first_type: ${{ steps.page.outputs.first is string }}
              nothing_is_none: ${{ steps.page.outputs.nothing is none }}
        """,
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].outputs == {
        "first": "item-1",
        "ids": [1, 2, 3],
        "nothing": None,
        "none_listed": [],
    }
    assert record.steps[1].outputs == {"first_type": True, "nothing_is_none": True}


async def test_body_is_json_only_when_the_content_type_says_so(
    write_project: ProjectWriter, open_runtime: RuntimeFactory
) -> None:
    """A JSON content type gives a parsed body; text/plain and broken JSON stay text."""
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: json
            http: {url: "@BASE@/echo"}
          - id: text
            http: {url: "@BASE@/text"}
          - id: broken
            http: {url: "@BASE@/bad-json"}
        outputs:
          json_method: ${{ steps.json.body.method }}
          text: ${{ steps.text.body }}
          broken: ${{ steps.broken.body }}
          broken_is_text: ${{ steps.broken.body is string }}
        """,
    )
    assert outputs_of(record) == {
        "json_method": "GET",
        "text": "plain words, not JSON",
        "broken": '{"truncated": [1, 2',
        "broken_is_text": True,
    }


async def test_next_url_pagination_concatenates_items_and_outputs(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """next_url pagination follows relative next links; items and list outputs span pages."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: all
            http:
              url: @BASE@/pages/next
              query: {key: @KEY@}
              paginate: {next_url: $.next, items: "$.data[*]"}
            outputs:
              ids: $.data[*].id
              last_page: $.page
        outputs:
          count: ${{ steps.all.body | length }}
          names: ${{ steps.all.body | map(attribute='name') | list }}
          ids: ${{ steps.all.outputs.ids }}
          last_page: ${{ steps.all.outputs.last_page }}
        """,
        KEY=key,
    )
    assert outputs_of(record) == {
        "count": 8,
        "names": [f"item-{i}" for i in range(1, 9)],
        "ids": list(range(1, 9)),
        "last_page": 2,
    }
    assert upstream.state.count(key) == 3
    assert record.steps[0].response is not None and record.steps[0].response["pages"] == 3


async def test_cursor_pagination(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """next_cursor pagination sends the cursor from each page as a query parameter."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: all
            http:
              url: @BASE@/pages/cursor
              query: {key: @KEY@}
              paginate:
                next_cursor: {path: $.cursor, param: cursor}
                items: "$.items[*]"
            outputs: {ids: "$.items[*].id"}
        """,
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].outputs == {"ids": list(range(1, 9))}
    urls = [r["url"] for r in upstream.state.requests(key)]
    assert len(urls) == 3
    assert "cursor=" not in urls[0] and "cursor=c1" in urls[1] and "cursor=c2" in urls[2]
    assert all(f"key={key}" in url for url in urls)


async def test_page_number_pagination_stops_on_an_empty_page(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """page pagination counts pages from `start` and stops when `items` finds nothing."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: all
            http:
              url: @BASE@/pages/numbered
              query: {key: @KEY@}
              paginate: {page: {param: page}, items: "$.data[*]"}
            outputs: {ids: "$.data[*].id"}
        """,
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].outputs == {"ids": list(range(1, 9))}
    urls = [r["url"] for r in upstream.state.requests(key)]
    assert [url.rsplit("page=", 1)[-1] if "page=" in url else "" for url in urls] == [
        "",
        "2",
        "3",
        "4",
    ]


async def test_page_number_pagination_with_stop_condition(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """A `stop` condition over `page.body` ends pagination without fetching an empty page."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: all
            http:
              url: @BASE@/pages/numbered
              query: {key: @KEY@, page: 1}
              paginate: {page: {param: page}, items: "$.data[*]", stop: "${{ page.body.last }}"}
        outputs:
          count: ${{ steps.all.body | length }}
        """,
        KEY=key,
    )
    assert outputs_of(record) == {"count": 8}
    assert upstream.state.count(key) == 3


async def test_max_pages_bounds_pagination(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, upstream: Upstream
) -> None:
    """`max_pages` stops pagination even when the API offers more."""
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: all
            http:
              url: @BASE@/pages/next
              query: {key: @KEY@}
              paginate: {next_url: $.next, items: "$.data[*]", max_pages: 2}
            outputs: {ids: "$.data[*].id"}
        """,
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    assert record.steps[0].outputs == {"ids": [1, 2, 3, 4, 5, 6]}
    assert upstream.state.count(key) == 2


# ---------------------------------------------------------------- secrets

SECRET = 's3cr3t+p@ss/w"rd=~'  # characters that URL, JSON and base64 encode differently
BEARER_TOKEN = "bearer-token-Zx81/+q"
API_KEY = "api-key-7781-abcd"
API_SECRET = "cs_secret/9f8e+7d"


def secret_forms(*values: str) -> dict[str, bytes]:
    """Every way a secret could end up written: raw, base64, URL- and JSON-encoded."""
    forms: dict[str, bytes] = {}
    for value in values:
        for name, form in (
            ("raw", value),
            ("base64", base64.b64encode(value.encode()).decode()),
            ("base64url", base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")),
            ("quoted", quote(value, safe="")),
            ("quoted_plus", quote_plus(value, safe="")),
            ("json", json.dumps(value)[1:-1]),
        ):
            forms[f"{value} ({name})"] = form.encode()
    forms["basic header"] = base64.b64encode(f"user:{SECRET}".encode())
    return forms


def leaks(data: bytes | str, forms: dict[str, bytes]) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    return [name for name, form in forms.items() if form in raw]


async def test_secrets_never_reach_the_history_errors_or_logs(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A secret used in headers, a query, a JSON body, inside longer text and base64-encoded,
    echoed back by the server and quoted in a failure, appears nowhere in the stored run,
    the run's error or the log."""
    monkeypatch.setenv("THE_SECRET", SECRET)
    monkeypatch.setenv("BOT_TOKEN", BEARER_TOKEN)
    caplog.set_level(logging.DEBUG)
    request = """
                http:
                  method: POST
                  url: @BASE@/echo
                  auth: bot
                  query: {token: "${{ secrets.THE_SECRET }}", status: "@STATUS@"}
                  headers:
                    X-Secret: "${{ secrets.THE_SECRET }}"
                    X-Long: "prefix-${{ secrets.THE_SECRET }}-suffix"
                    X-B64: "${{ secrets.THE_SECRET | b64encode }}"
                    X-Basic: "Basic ${{ ('user:' ~ secrets.THE_SECRET) | b64encode }}"
                  json:
                    password: "${{ secrets.THE_SECRET }}"
                    note: "pw=${{ secrets.THE_SECRET }}"
    """
    flow = """
            name: f
            steps:
              - id: ok
    @OK@
              - id: note
                log: "using ${{ secrets.THE_SECRET }} for ${{ steps.ok.body.query.token[0] }}"
              - id: copy
                set: {echoed: "${{ steps.ok.body.json }}"}
              - id: rejected
    @REJECTED@
            outputs:
              echoed: ${{ steps.ok.body.headers }}
    """
    flow = flow.replace("    @OK@\n", request.replace("@STATUS@", "200").lstrip("\n").rstrip(" "))
    flow = flow.replace(
        "    @REJECTED@\n", request.replace("@STATUS@", "400").lstrip("\n").rstrip(" ")
    )
    root = write_project(
        {"f": flow},
        {
            "bot": """
            name: bot
            kind: bearer
            token: ${{ secrets.BOT_TOKEN }}
            allowed_hosts: [127.0.0.1]
            """
        },
    )
    runtime = open_runtime(root)
    record = await runtime.engine.run("f")
    assert record.status == "failed"
    assert record.error is not None and "answered 400, expected 2xx" in record.error
    ok = record.steps[0]
    assert ok.request is not None and ok.response is not None
    assert ok.request["headers"]["x-secret"] == "***"
    assert ok.request["headers"]["x-long"] == "prefix-***-suffix"
    assert ok.request["headers"]["x-basic"] == "Basic ***"
    assert ok.request["headers"]["authorization"] == "***"
    assert ok.response["body"]["json"] == {"password": "***", "note": "pw=***"}
    assert ok.response["headers"]["x-echo-authorization"] == "Bearer ***"
    assert record.steps[1].message == "using *** for ***"
    await runtime.aclose()

    forms = secret_forms(SECRET, BEARER_TOKEN)
    state = root / ".flowrunner"
    stored = b"".join(path.read_bytes() for path in sorted(state.iterdir()) if path.is_file())
    assert b"answered 400" in stored  # the run is in there
    assert leaks(stored, forms) == []
    assert leaks(record.error, forms) == []
    assert leaks(caplog.text, forms) == [], caplog.text
    assert leaks(json.dumps(dataclasses.asdict(record), default=str), forms) == []


async def test_profile_credentials_are_masked_in_the_stored_request(
    write_project: ProjectWriter, open_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bearer token and an api_key (header and query) are sent, and stored masked."""
    monkeypatch.setenv("BOT_TOKEN", BEARER_TOKEN)
    monkeypatch.setenv("SHOP_KEY", API_KEY)
    monkeypatch.setenv("SHOP_SECRET", API_SECRET)
    root = write_project(
        {
            "f": """
            name: f
            steps:
              - id: bearer
                http: {url: "@BASE@/echo", auth: bot}
                outputs: {authorization: $.headers.authorization}
              - id: keyed
                http: {url: "@BASE@/echo", auth: shop, query: {page: 2}}
                outputs: {key: "$.headers['x-api-key']", secret: "$.query.consumer_secret[0]"}
            outputs:
              sent_ok: "${{ steps.bearer.body.headers.authorization
                            == 'Bearer ' ~ secrets.BOT_TOKEN }}"
              key_ok: ${{ steps.keyed.body.query.consumer_secret[0] == secrets.SHOP_SECRET }}
            """
        },
        {
            "bot": """
            name: bot
            kind: bearer
            token: ${{ secrets.BOT_TOKEN }}
            allowed_hosts: [127.0.0.1]
            """,
            "shop": """
            name: shop
            kind: api_key
            headers: {X-API-Key: "${{ secrets.SHOP_KEY }}"}
            query: {consumer_secret: "${{ secrets.SHOP_SECRET }}"}
            allowed_hosts: [127.0.0.1]
            """,
        },
    )
    runtime = open_runtime(root)
    record = await runtime.engine.run("f")
    assert record.status == "succeeded", record.error
    assert record.outputs == {"sent_ok": True, "key_ok": True}
    stored = runtime.history.get_run(record.id)
    assert stored is not None
    bearer, keyed = stored.steps
    assert bearer.request is not None and keyed.request is not None
    assert bearer.request["headers"]["authorization"] == "***"
    assert bearer.outputs == {"authorization": "Bearer ***"}
    assert keyed.request["headers"]["x-api-key"] == "***"
    assert keyed.request["url"].endswith("/echo?page=2&consumer_secret=***")
    assert keyed.outputs == {"key": "***", "secret": "***"}
    dumped = json.dumps(dataclasses.asdict(stored), default=str)
    assert leaks(dumped, secret_forms(BEARER_TOKEN, API_KEY, API_SECRET)) == []


# ---------------------------------------------------------------- allowed hosts


async def test_credential_for_a_host_outside_allowed_hosts_is_never_sent(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request with an auth profile to a host outside its allowed_hosts fails before
    anything is sent, naming the profile and the host."""
    monkeypatch.setenv("BOT_TOKEN", BEARER_TOKEN)
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: leak
            http: {url: "@BASE@/echo?key=@KEY@", auth: bot}
        """,
        profiles={
            "bot": """
            name: bot
            kind: bearer
            token: ${{ secrets.BOT_TOKEN }}
            base_url: https://acme.iobeya.example/api
            """
        },
        KEY=key,
    )
    assert record.status == "failed"
    assert record.error == (
        "step leak: auth profile 'bot' may only send its credential to acme.iobeya.example; "
        "this request goes to 127.0.0.1. Add the host to allowed_hosts if it is trusted."
    )
    assert upstream.state.count(key) == 0
    assert record.steps[0].attempts == 0


async def test_redirect_to_another_host_drops_the_credential(
    write_project: ProjectWriter,
    open_runtime: RuntimeFactory,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A redirect from an allowed host to another one arrives without the profile's
    Authorization header or API key header."""
    monkeypatch.setenv("BOT_TOKEN", BEARER_TOKEN)
    monkeypatch.setenv("SHOP_KEY", API_KEY)
    key = upstream.key()
    record = await run_flow(
        write_project,
        open_runtime,
        """
        name: f
        steps:
          - id: bearer
            http: {url: "@BASE@/redirect?key=@KEY@-bearer", auth: bot}
          - id: keyed
            http: {url: "@BASE@/redirect?key=@KEY@-keyed", auth: shop}
          - id: same_host
            http: {url: "@BASE@/echo", auth: bot}
        outputs:
          bearer: ${{ steps.bearer.body }}
          keyed: ${{ steps.keyed.body }}
          same_host_auth: ${{ steps.same_host.body.headers.authorization is defined }}
        """,
        profiles={
            "bot": """
            name: bot
            kind: bearer
            token: ${{ secrets.BOT_TOKEN }}
            allowed_hosts: [127.0.0.1]
            """,
            "shop": """
            name: shop
            kind: api_key
            headers: {X-API-Key: "${{ secrets.SHOP_KEY }}"}
            allowed_hosts: [127.0.0.1]
            """,
        },
        KEY=key,
    )
    assert record.status == "succeeded", record.error
    landed = f"localhost:{upstream.port}"
    assert record.outputs == {
        "bearer": {"host": landed, "authorization": False, "api_key": False},
        "keyed": {"host": landed, "authorization": False, "api_key": False},
        "same_host_auth": True,
    }
    for suffix in ("bearer", "keyed"):
        (first,) = upstream.state.requests(f"{key}-{suffix}")
        (second,) = upstream.state.requests(f"{key}-{suffix}:landing")
        assert first["headers"].get("authorization") or first["headers"].get("x-api-key")
        assert "authorization" not in second["headers"]
        assert "x-api-key" not in second["headers"]
