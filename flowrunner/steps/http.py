"""The ``http`` step: render the request, apply the auth profile, send with retries,
follow redirects and pagination, and extract outputs with JSONPath.

Requests go out through the run's wire (:mod:`flowrunner.wire`), not through an httpx
client: this is the path every step of every run takes."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import random
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urljoin

from multidict import CIMultiDict
from yarl import URL

from flowrunner import jsontext
from flowrunner.expressions import compile_value, to_text
from flowrunner.jsonpaths import compile_jsonpath
from flowrunner.model import IDEMPOTENT_METHODS, HttpStep, Retry
from flowrunner.model.base import PerModel, status_matches
from flowrunner.model.profiles import ProfileBase
from flowrunner.runtime import RunContext, Scope, StepFailed, StepResult, step_result
from flowrunner.wire import (
    DEFAULT_TIMEOUT,
    USER_AGENT,
    BodyTooLarge,
    WireAuth,
    WireConnectionError,
    WireRequest,
    WireResponse,
    WireTimeout,
    merge_query,
    parse_url,
    redirect_request,
    send_with_auth,
    url_text,
    without_query,
)

DEFAULT_RETRY = Retry()
NO_RETRY = Retry(attempts=1)
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
MAX_REDIRECTS = 20
_HIDDEN_HEADERS = frozenset({"authorization", "cookie"})


class HostNotAllowed(StepFailed):
    """A credential would have gone to a host outside its profile's allowed_hosts."""


@functools.lru_cache(maxsize=1024)  # every request with a profile asks
def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower()
    for pattern in allowed:
        if pattern.startswith("*.") and (host.endswith(pattern[1:]) or host == pattern[2:]):
            return True
        if host == pattern:
            return True
    return False


class _Plan:
    """An http step's settings, read from its model once (see ``PerModel``): a request
    reads some forty of them. What is rendered (URL, query, headers, body) is compiled
    once too; None where the step has none."""

    __slots__ = (
        "method", "url", "auth", "query", "headers", "json", "form",
        "body", "timeout", "step_timeout", "follow_redirects", "retry", "retry_on", "attempts",
        "expect", "paginate", "outputs",
    )  # fmt: skip

    def __init__(self, step: HttpStep) -> None:
        spec = step.http
        self.method, self.auth = spec.method, spec.auth
        self.url = compile_value(spec.url)
        self.query = compile_value(spec.query) if spec.query else None
        self.headers = compile_value(spec.headers) if spec.headers else None
        self.json = compile_value(spec.json_) if spec.has_json else None
        self.form = compile_value(spec.form) if spec.form is not None else None
        self.body = compile_value(spec.body) if spec.body is not None else None
        timeout = spec.timeout or step.timeout
        self.timeout = timeout.total_seconds() if timeout else DEFAULT_TIMEOUT
        self.step_timeout = step.timeout.total_seconds() if step.timeout else float("inf")
        self.follow_redirects = spec.follow_redirects
        self.retry = retry = step.retry or (
            DEFAULT_RETRY if spec.method in IDEMPOTENT_METHODS else NO_RETRY
        )
        self.retry_on, self.attempts = _retry_statuses(tuple(retry.on)), retry.attempts
        self.expect, self.paginate, self.outputs = spec.expect, spec.paginate, step.outputs


_plan_of = PerModel(_Plan)


class _ProfilePlan:
    """What a request reads of its auth profile, read once (see ``PerModel``)."""

    __slots__ = ("allowed", "base_url", "name")

    def __init__(self, profile: ProfileBase) -> None:
        self.name = profile.name
        self.base_url = profile.base_url.rstrip("/") + "/" if profile.base_url else None
        self.allowed = tuple(profile.default_hosts())


_profile_plan_of = PerModel(_ProfilePlan)


class HttpCall:
    """Everything about one http step's execution; recorded as the step's history."""

    def __init__(self, step: HttpStep, scope: Scope, run: RunContext) -> None:
        self.step = step
        self.plan = _plan_of(step)
        self.scope = scope
        self.run = run
        self.attempts = 0
        self.response_record: dict[str, Any] | None = None
        # What was sent, described for the history only when someone reads it: most runs
        # never need it before they end, and a description costs masking every header.
        self._sent: WireRequest | None = None
        self._record: dict[str, Any] | None = None

    @property
    def request_record(self) -> dict[str, Any] | None:
        if self._record is None and self._sent is not None:
            self._record = self.describe(self._sent)
        return self._record

    def sent(self, request: WireRequest) -> None:
        self._sent, self._record = request, None

    # ------------------------------------------------------------ building the request

    def build(
        self, url_override: str | None = None, extra_query: dict[str, Any] | None = None
    ) -> tuple[WireRequest, str | None]:
        spec = self.plan
        names = self.scope.names
        text = url_override or to_text(spec.url(names))
        profile = _profile_plan_of(self.run.auth.profile(spec.auth)) if spec.auth else None
        if (
            profile is not None
            and profile.base_url
            and not text.startswith(("http://", "https://"))
        ):
            text = profile.base_url + text.lstrip("/")
        if not text.startswith(("http://", "https://")):
            raise StepFailed(
                f"URL {self.run.masker.mask(text)!r} is not absolute (http:// or https://)"
            )
        try:
            url = parse_url(text)
        except ValueError as exc:
            raise StepFailed(f"URL {self.run.masker.mask(text)!r} is not valid: {exc}") from None
        host = url.host
        if not host:
            raise StepFailed(f"URL {self.run.masker.mask(text)!r} has no host")
        query = {k: _query_value(v) for k, v in spec.query(names).items()} if spec.query else {}
        if url_override:
            query = {}
        query.update(extra_query or {})
        if query:
            url = merge_query(url, query)  # added to the URL's own query string
        headers: CIMultiDict[str] = CIMultiDict()
        if spec.headers is not None:
            for key, rendered in spec.headers(names).items():
                name, value = str(key), to_text(rendered)
                if not (name.isascii() and value.isascii()):
                    raise StepFailed(
                        f"header {name!r} has non-ASCII characters, which HTTP headers cannot "
                        "carry; encode the value (with the urlencode or b64encode filter)"
                    )
                headers.add(name, value)
        content: bytes | None = None
        if spec.json is not None:
            content = jsontext.dumps_bytes(spec.json(names))  # compact, UTF-8, as httpx
            if "Content-Type" not in headers:
                headers["Content-Type"] = "application/json"
        elif spec.form is not None:
            form = {k: to_text(v) for k, v in spec.form(names).items()}
            content = urlencode(form).encode()
            if "Content-Type" not in headers:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif spec.body is not None:
            content = to_text(spec.body(names)).encode()
        if "User-Agent" not in headers:
            headers["User-Agent"] = USER_AGENT
        request = WireRequest(spec.method, url, headers, content, spec.timeout)
        if profile is not None:
            allowed = profile.allowed
            if not host_allowed(host, allowed):
                raise HostNotAllowed(
                    f"auth profile '{profile.name}' may only send its credential to "
                    f"{', '.join(allowed) or 'no host'}; this request goes to {host}. "
                    "Add the host to allowed_hosts if it is trusted."
                )
        return request, spec.auth

    def describe(self, request: WireRequest) -> dict[str, Any]:
        mask = self.run.masker.mask
        content = request.content
        body = content.decode("utf-8", errors="replace") if content else None
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            if key in _HIDDEN_HEADERS:
                headers[key] = "***"
            else:
                headers[key] = f"{headers[key]}, {mask(value)}" if key in headers else mask(value)
        return {
            "auth": self.plan.auth,
            "method": request.method,
            "url": mask(url_text(request.url)),
            "headers": headers,
            "body": self.run.excerpt(body) if body else None,
        }

    def _url(self) -> str:
        record = self.request_record
        return str(record["url"]) if record else ""

    # ------------------------------------------------------------ sending

    async def send(self, request: WireRequest, auth_name: str | None) -> tuple[WireResponse, Any]:
        spec = self.plan
        retry = spec.retry
        per_request = request.timeout
        deadline = time.monotonic() + spec.step_timeout
        self.sent(request)
        if self.run.dry_run:
            raise _DryRun()
        # What the step built, before any auth flow adds its credential to the request
        # (what a redirect to another host must not carry).
        built = (
            _Built(request.headers.copy(), request.url)
            if auth_name and spec.follow_redirects
            else None
        )
        attempt = 0
        while True:
            attempt += 1
            self.attempts = attempt
            auth = await self.run.auth.auth_for(auth_name, self.run) if auth_name else None
            response: WireResponse | None = None
            body: Any = None
            cause: Exception | None = None
            try:
                response = await self.send_following(request, auth, auth_name, built)
            except BodyTooLarge:
                raise StepFailed(
                    f"the response body is larger than {self.run.body_limit // 1048576} MB; "
                    "flowrunner stopped reading it"
                ) from None
            except WireTimeout as exc:
                failure, condition = f"timed out after {per_request:g}s", "timeout"
                cause = exc
            except WireConnectionError as exc:
                failure, condition = f"connection failed: {exc.kind}: {exc.message}", "connection"
                cause = exc
            else:
                # The auth flow may have set headers: describe what was really sent.
                self.sent(response.request)
                body = parse_body(response)
                if not _should_retry(spec.retry_on, response.status_code) or (
                    attempt >= spec.attempts
                ):
                    return response, body
                failure, condition = f"HTTP {response.status_code}", str(response.status_code)
            if response is None and (condition not in retry.on or attempt >= spec.attempts):
                raise StepFailed(f"{spec.method} {self._url()}: {failure}") from cause
            delay = _backoff(retry, attempt, response)
            if time.monotonic() + delay > deadline:
                if response is not None:
                    return response, body
                raise StepFailed(
                    f"{spec.method} {self._url()}: {failure}; "
                    "no time left to retry within the step's timeout"
                ) from cause
            await asyncio.sleep(delay)

    async def send_following(
        self,
        request: WireRequest,
        auth: WireAuth | None,
        auth_name: str | None,
        built: _Built | None,
    ) -> WireResponse:
        """Send, following redirects; a redirect to a host outside the auth profile's
        allowed_hosts goes there without the credential: every header and query parameter
        the auth flow added is removed (not only an Authorization header)."""
        wire, limit, spec = self.run.wire, self.run.body_limit, self.plan
        response = await send_with_auth(wire, request, auth, limit)
        if not spec.follow_redirects:
            return response
        allowed: tuple[str, ...] | None = None  # the profile's hosts, at the first redirect
        sent = response.request  # with the credential on
        for hop in range(MAX_REDIRECTS + 1):
            following = redirect_request(response)
            if following is None:
                return response
            if hop == MAX_REDIRECTS:
                break
            if auth is None or built is None or auth_name is None:
                response = await wire.send(following, limit)
                continue
            if allowed is None:
                allowed = _profile_plan_of(self.run.auth.profile(auth_name)).allowed
            if host_allowed(following.url.host or "", allowed):
                response = await send_with_auth(wire, following, auth, limit)
            else:
                _drop_credential(following, sent, built)
                response = await wire.send(following, limit)
        raise StepFailed(
            f"{spec.method} {self.run.masker.mask(str(request.url))}: "
            f"more than {MAX_REDIRECTS} redirects"
        )


def parse_body(response: WireResponse) -> Any:
    """The body as text, or parsed JSON when the content type says JSON and it parses."""
    is_json = "json" in response.headers.get("Content-Type", "").lower()
    if is_json and response.encoding == "utf-8":
        parsed = jsontext.loads_utf8(response.content)  # no text made on the way
        if parsed is not jsontext.NOT_READ:
            return parsed
    text = response.text
    if is_json and text.strip():
        try:
            return jsontext.loads(text)
        except ValueError:
            return text
    return text


class _Built:
    """A request's headers and URL as the step built them, before any auth."""

    __slots__ = ("headers", "url")

    def __init__(self, headers: CIMultiDict[str], url: URL) -> None:
        self.headers = headers
        self.url = url


def _drop_credential(following: WireRequest, sent: WireRequest, built: _Built) -> None:
    """Remove from a redirect what the auth flow added to the request that was sent."""
    for name in set(sent.headers.keys()):
        if sent.headers.getall(name) != built.headers.getall(name, []):
            following.headers.popall(name, None)
    added = set(sent.url.query.keys()) - set(built.url.query.keys())
    if added:
        following.url = without_query(following.url, added)


class _DryRun(Exception):
    """Raised inside send() to stop before the network in --dry-run mode."""


def _query_value(value: Any) -> Any:
    if isinstance(value, list):
        return [to_text(v) for v in value]
    return to_text(value)


def _should_retry(retry_on: tuple[frozenset[int], frozenset[int]], status: int) -> bool:
    statuses, classes = retry_on
    return status in statuses or status // 100 in classes


@functools.lru_cache(maxsize=256)
def _retry_statuses(on: tuple[int | str, ...]) -> tuple[frozenset[int], frozenset[int]]:
    """A retry's ``on`` as the statuses it names and the classes (4, 5) of 4xx and 5xx."""
    statuses = frozenset(c for c in on if isinstance(c, int) and not isinstance(c, bool))
    classes = frozenset(int(c[0]) for c in on if c in ("4xx", "5xx"))
    return statuses, classes


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds or as an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _backoff(retry: Retry, attempt: int, response: WireResponse | None) -> float:
    if response is not None:
        after = retry_after_seconds(response.headers.get("retry-after"))
        if after is not None:
            return after
    base = retry.delay.total_seconds()
    if retry.backoff == "exponential":
        base *= 2 ** (attempt - 1)
    capped = min(base, retry.max_delay.total_seconds())
    # Full jitter spreads retries from many runs hitting the same API.
    return random.uniform(capped / 2, capped)  # noqa: S311 - jitter, not cryptography


# ---------------------------------------------------------------- the step


async def run_http_step(
    step: HttpStep, scope: Scope, run: RunContext, call: HttpCall | None = None
) -> tuple[StepResult, HttpCall]:
    call = call or HttpCall(step, scope, run)
    try:
        return await _exchange(call), call
    except StepFailed as failure:
        failure.call = call
        raise


async def _exchange(call: HttpCall) -> StepResult:
    run, spec = call.run, call.plan
    request, auth_name = call.build()
    paginate = spec.paginate
    try:
        response, body = await call.send(request, auth_name)
    except _DryRun:
        return step_result()
    pages = [body]
    check_expect(call, response, body)
    if paginate is not None:
        pages = await follow_pages(call, request, auth_name, body)
    outputs = extract_outputs(spec.outputs, pages)
    if paginate is not None and paginate.items:
        items: list[Any] = []
        path = compile_jsonpath(paginate.items)
        for page in pages:
            found = path.values(page)
            items.extend(found if isinstance(found, list) else [found] if found is not None else [])
        result_body: Any = items
    else:
        result_body = pages[-1] if paginate is None else pages
    call.response_record = {
        **describe_response(run, response, body),
        "pages": len(pages) if paginate is not None else None,
    }
    return step_result(response.status_code, response.header_dict(), result_body, outputs)


def describe_response(run: RunContext, response: WireResponse, body: Any) -> dict[str, Any]:
    """The response as the history keeps it: masked, bounded, without cookies."""
    return {
        "status": response.status_code,
        "headers": {
            k: run.masker.mask(v) for k, v in response.header_dict().items() if k != "set-cookie"
        },
        "body": run.excerpt(body),
    }


def check_expect(call: HttpCall, response: WireResponse, body: Any) -> None:
    expect = call.plan.expect
    if status_matches(response.status_code, expect):
        return
    call.response_record = describe_response(call.run, response, body)
    wanted = ", ".join(str(e) for e in expect)
    detail = call.run.excerpt(body)
    detail_text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    raise StepFailed(
        f"{call.plan.method} {call.request_record['url'] if call.request_record else ''} "
        f"answered {response.status_code}, expected {wanted}: {detail_text[:300]}",
        result=step_result(response.status_code, response.header_dict(), body),
    )


async def follow_pages(
    call: HttpCall, first: WireRequest, auth_name: str | None, body: Any
) -> list[Any]:
    paginate = call.plan.paginate
    if paginate is None:
        return [body]
    pages = [body]
    items_path = compile_jsonpath(paginate.items) if paginate.items else None
    page_number = paginate.page.start if paginate.page else 0
    while len(pages) < paginate.max_pages:
        current = pages[-1]
        if items_path is not None and not items_path.values(current):
            break
        if paginate.stop is not None:
            scope = call.scope.child(page={"number": len(pages), "body": current})
            if scope.condition(paginate.stop):
                break
        if paginate.next_url is not None:
            next_url = compile_jsonpath(paginate.next_url).values(current)
            if not next_url:
                break
            url = urljoin(str(first.url), str(next_url))
            request, _ = call.build(url_override=url)
        elif paginate.next_cursor is not None:
            cursor = compile_jsonpath(paginate.next_cursor.path).values(current)
            if cursor in (None, ""):
                break
            request, _ = call.build(extra_query={paginate.next_cursor.param: to_text(cursor)})
        elif paginate.page is not None:
            page_number += paginate.page.step
            request, _ = call.build(extra_query={paginate.page.param: str(page_number)})
        else:
            break
        response, current = await call.send(request, auth_name)
        check_expect(call, response, current)
        pages.append(current)
    return pages


def extract_outputs(sources: dict[str, str], pages: list[Any]) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    for name, source in sources.items():
        path = compile_jsonpath(source)
        if path.is_multiple:
            values: list[Any] = []
            for page in pages:
                values.extend(path.values(page))
            outputs[name] = values
        else:
            outputs[name] = path.values(pages[-1])
    return outputs
