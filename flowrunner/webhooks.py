"""Webhook intake at ``/hooks/<path>``: check, store durably, then answer.

Every refusal is a 4xx with a reason and creates no run. An accepted webhook is in the
state store before its 2xx leaves, so a crash after the answer loses nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from flowrunner import jsontext
from flowrunner.auth.jwt import user_of_credential
from flowrunner.dispatcher import Dispatcher, Submitted
from flowrunner.errors import ExpressionError, FlowrunnerError
from flowrunner.expressions import render, to_text
from flowrunner.loader import Project
from flowrunner.model import Webhook
from flowrunner.model.flow import HmacAuth
from flowrunner.runtime import RunStatus
from flowrunner.secrets import Masker, SecretStore
from flowrunner.store.queue import Dedupe
from flowrunner.store.runs import RunRecord

log = logging.getLogger("flowrunner.webhooks")


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Route:
    """A webhook and its flow, with what each call reads of the webhook read once: a
    pydantic model's attributes are slow to read."""

    __slots__ = ("auth", "dedupe", "flow", "max_body", "methods", "respond", "timeout")

    def __init__(self, flow: str, webhook: Webhook) -> None:
        self.flow = flow
        self.methods, self.max_body, self.auth = webhook.methods, webhook.max_body, webhook.auth
        self.dedupe, self.respond = webhook.dedupe, webhook.respond
        self.timeout = webhook.timeout.total_seconds()


def routes_of(project: Project) -> dict[str, Route]:
    return {
        webhook.path: Route(name, webhook)
        for name, loaded in project.flows.items()
        for webhook in loaded.flow.webhooks
    }


class ClientGone(Exception):
    """The caller left before its whole body came."""


class Answer:
    """An answer, sent as the ASGI messages Starlette's ``Response`` sends, with the same
    headers (``content-length`` and ``content-type`` unless given), without building one:
    on the path every webhook takes, a Response and its headers cost more than the rest
    of the answer."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        media_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        raw = (
            [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            if headers
            else []
        )
        keys = {name for name, _ in raw}
        if b"content-length" not in keys and not (status < 200 or status in (204, 304)):
            raw.append((b"content-length", str(len(body)).encode()))
        if media_type is not None and b"content-type" not in keys:
            raw.append((b"content-type", media_type.encode("latin-1")))
        self.headers = raw

    async def __call__(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def json_answer(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """JSON written by orjson: the bytes Starlette's JSONResponse writes (compact, UTF-8);
    a value JSON has no type for is written as text."""
    return Answer(status, jsontext.dumps_bytes(content), "application/json", headers)


def route_path(scope: Scope) -> str:
    """The request's path below the app's root path, as Starlette's routing reads it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


class WebhookEndpoint:
    def __init__(
        self,
        routes: Callable[[], dict[str, Route]],
        dispatcher: Dispatcher,
        secrets: SecretStore,
    ) -> None:
        self.routes = routes
        self.dispatcher = dispatcher
        self.secrets = secrets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app of ``/hooks/<path>``, called before Starlette's routing and
        middleware (see ``flowrunner.server``): an error of ours still reaches the
        server's 500."""
        answer = await self.endpoint(scope, receive)
        await answer(send)

    async def endpoint(self, scope: Scope, receive: Receive) -> Answer:
        try:
            return await self.handle(scope, receive)
        except Refused as refused:
            log.info("webhook %s refused: %s", scope["path"], refused.reason)
            return json_answer({"error": refused.reason}, refused.status)
        except ClientGone:
            # Gone before its whole body came (or a malformed chunk): no run, and nobody
            # to answer.
            log.info("webhook %s: the caller left before sending its body", scope["path"])
            return Answer(400, b"")

    async def handle(self, scope: Scope, receive: Receive) -> Answer:
        path = route_path(scope).removeprefix("/hooks/").strip("/")
        route = self.routes().get(path)
        if route is None:
            raise Refused(404, f"no webhook at /hooks/{path}")
        method = scope["method"]
        if method not in route.methods:
            raise Refused(405, f"/hooks/{path} accepts {', '.join(route.methods)}")
        # Read once, as the names come from the server (lower case).
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        raw = await read_limited(receive, route.max_body, headers)
        names = {"secrets": self.secrets.view(Masker())}
        user_token = self.authenticate(headers, raw, route, names)
        query_string = scope["query_string"]
        trigger = {
            "kind": "webhook",
            "body": parse_body(headers.get("content-type", ""), raw),
            "headers": headers,
            "query": dict(QueryParams(query_string)) if query_string else {},
            "method": method,
            "path": path,
            # Who called, when the webhook acts as the calling user and the token says.
            "user": user_of_credential(user_token),
        }
        dedupe = None
        if route.dedupe is not None:
            try:
                key = to_text(render(route.dedupe.key, {**names, "trigger": trigger}))
            except ExpressionError as exc:
                # A sender that omits its delivery id still gets its run, just no dedupe.
                log.info("no dedupe key for /hooks/%s: %s", path, exc.message)
                key = ""
            if key:
                dedupe = Dedupe(f"webhook:{route.flow}", key, route.dedupe.for_)
        try:
            submitted = await self.dispatcher.submit(
                route.flow,
                trigger,
                None,
                user_token,
                dedupe,
                caller_waits=route.respond == "wait",
            )
        except FlowrunnerError as exc:
            raise Refused(503, exc.message) from None
        return await self.answer(scope, headers, submitted, route)

    def authenticate(
        self, headers: dict[str, str], raw: bytes, route: Route, names: dict[str, Any]
    ) -> str | None:
        auth = route.auth
        if auth == "none":
            return None
        header = headers.get("authorization", "")
        if auth.hmac is not None:
            check_hmac(auth.hmac, headers, raw, to_text(render(auth.hmac.secret, names)))
        elif auth.bearer is not None:
            expected = "Bearer " + to_text(render(auth.bearer.token, names))
            if not hmac.compare_digest(header.encode(), expected.encode()):
                raise Refused(401, "a valid bearer token is required")
        elif auth.basic is not None:
            pair = (
                f"{to_text(render(auth.basic.username, names))}:"
                f"{to_text(render(auth.basic.password, names))}"
            )
            expected = "Basic " + base64.b64encode(pair.encode()).decode()
            if not hmac.compare_digest(header.encode(), expected.encode()):
                raise Refused(401, "valid basic credentials are required")
        elif auth.connected_user:
            if not header.strip():
                raise Refused(
                    401,
                    "this webhook acts as the calling user: send the user's "
                    "token in the Authorization header",
                )
            return header.strip()
        return None

    async def answer(
        self, scope: Scope, headers: dict[str, str], submitted: Submitted, route: Route
    ) -> Answer:
        status_url = status_url_of(scope, submitted.run_id, headers.get("host"))
        body: dict[str, Any] = {"run_id": submitted.run_id, "status_url": status_url}
        if submitted.status in (RunStatus.SKIPPED, RunStatus.FAILED):
            return json_answer(
                {**body, "status": submitted.status, "reason": submitted.reason},
                409 if submitted.status == RunStatus.FAILED else 200,
            )
        if route.respond == "immediate":
            extra = {"duplicate": True} if submitted.status == "duplicate" else {}
            return json_answer({**body, "status": "queued", **extra}, 202)
        record = await self.dispatcher.wait_for(submitted.run_id, route.timeout)
        if record is None:
            try:
                await self.dispatcher.stored(submitted.run_id)
            except Exception as exc:
                log.error("run %s could not be stored: %s", submitted.run_id, exc)
                raise Refused(503, "the run could not be stored; try again") from None
            return json_answer({**body, "status": "running"}, 202)
        return run_answer(record, body)


# The status URL up to the run id, by how the request reached us (scheme, Host header,
# root path): building it from the scope costs ~60 us a time.
_STATUS_PREFIXES: dict[tuple[Any, ...], str] = {}
_STATUS_PREFIXES_MAX = 64  # Host is the caller's to choose: the cache stays bounded


def status_url_of(scope: Scope, run_id: str, host: str | None) -> str:
    key = (scope.get("scheme"), scope.get("root_path"), scope.get("server"), host)
    prefix = _STATUS_PREFIXES.get(key)
    if prefix is None:
        if len(_STATUS_PREFIXES) >= _STATUS_PREFIXES_MAX:
            _STATUS_PREFIXES.clear()
        # What Starlette's url_for("run_status") gives: its base URL, then the route.
        prefix = str(Request(scope).base_url).rstrip("/") + "/runs/"
        _STATUS_PREFIXES[key] = prefix
    return prefix + run_id


def run_answer(record: RunRecord, body: dict[str, Any]) -> Answer:
    """The `respond` step's answer, else a summary of the run."""
    if record.response:
        response = record.response
        headers = {str(k): str(v) for k, v in (response.get("headers") or {}).items()}
        if "json" in response:
            return json_answer(response["json"], response["status"], headers)
        text = str(response.get("body") or "")
        return Answer(response["status"], text.encode(), None, headers)
    summary = {**body, "status": record.status}
    if record.status == RunStatus.SUCCEEDED:
        return json_answer({**summary, "outputs": record.outputs}, 200)
    return json_answer({**summary, "error": record.error}, 500)


async def read_limited(receive: Receive, limit: int, headers: dict[str, str]) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes: at once when its
    Content-Length says so, else as soon as that much has come."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_body(content_type: str, raw: bytes) -> Any:
    content_type = content_type.lower()
    if not raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "the body is not UTF-8 text") from None
    if "json" in content_type:
        try:
            return jsontext.loads(text)
        except ValueError as exc:
            raise Refused(400, f"the body is not valid JSON: {exc}") from None
    if "application/x-www-form-urlencoded" in content_type:
        return dict(parse_qsl(text, keep_blank_values=True))
    return text


def check_hmac(spec: HmacAuth, headers: dict[str, str], raw: bytes, secret: str) -> None:
    signature = headers.get(spec.header.lower(), "")
    if not signature:
        raise Refused(401, f"the {spec.header} signature header is missing")
    if spec.prefix:
        if not signature.startswith(spec.prefix):
            raise Refused(401, f"the signature must start with {spec.prefix!r}")
        signature = signature[len(spec.prefix) :]
    signed = raw
    if spec.timestamp_header:
        stamp = headers.get(spec.timestamp_header.lower(), "")
        try:
            sent_at = float(stamp)
        except ValueError:
            raise Refused(
                401, f"the {spec.timestamp_header} timestamp is missing or invalid"
            ) from None
        if abs(time.time() - sent_at) > spec.tolerance.total_seconds():
            raise Refused(401, "the timestamp is outside the tolerance window (a replay?)")
        signed = stamp.encode() + b"." + raw
    digest = hmac.new(secret.encode(), signed, getattr(hashlib, spec.algorithm)).digest()
    expected = digest.hex() if spec.encoding == "hex" else base64.b64encode(digest).decode()
    if not hmac.compare_digest(
        signature.strip().lower() if spec.encoding == "hex" else signature.strip(), expected
    ):
        raise Refused(401, "the signature does not match the body")
