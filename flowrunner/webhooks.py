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
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
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


@dataclass(frozen=True)
class Route:
    flow: str
    webhook: Webhook


def routes_of(project: Project) -> dict[str, Route]:
    return {
        webhook.path: Route(name, webhook)
        for name, loaded in project.flows.items()
        for webhook in loaded.flow.webhooks
    }


class JSONAnswer(JSONResponse):
    """A JSON answer, written by orjson: the bytes JSONResponse writes (compact, UTF-8),
    for less than half its cost; a value JSON has no type for is written as text."""

    def render(self, content: Any) -> bytes:
        return jsontext.dumps_bytes(content)


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
        """The ASGI app of ``/hooks/<path>``: the request goes straight to ``endpoint``,
        without the wrapper Starlette puts around a function endpoint for exception
        handlers (none is registered; an error of ours still reaches the server's 500)."""
        response = await self.endpoint(Request(scope, receive, send))
        await response(scope, receive, send)

    async def endpoint(self, request: Request) -> Response:
        try:
            return await self.handle(request)
        except Refused as refused:
            log.info("webhook %s refused: %s", request.url.path, refused.reason)
            return JSONAnswer({"error": refused.reason}, status_code=refused.status)
        except ClientDisconnect:
            # Gone before its whole body came (or a malformed chunk): no run, and nobody
            # to answer.
            log.info("webhook %s: the caller left before sending its body", request.url.path)
            return Response(status_code=400)

    async def handle(self, request: Request) -> Response:
        path = request.path_params["path"].strip("/")
        route = self.routes().get(path)
        if route is None:
            raise Refused(404, f"no webhook at /hooks/{path}")
        webhook = route.webhook
        if request.method not in webhook.methods:
            raise Refused(405, f"/hooks/{path} accepts {', '.join(webhook.methods)}")
        # Read once, as the names come from the server (lower case) and Starlette's
        # Headers would decode them again at each look-up.
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in request.scope["headers"]
        }
        raw = await read_limited(request, webhook.max_body, headers)
        names = {"secrets": self.secrets.view(Masker())}
        user_token = self.authenticate(headers, raw, webhook, names)
        trigger = {
            "kind": "webhook",
            "body": parse_body(headers.get("content-type", ""), raw),
            "headers": headers,
            # (Starlette's QueryParams, for nothing, when there is no query string)
            "query": dict(request.query_params) if request.scope["query_string"] else {},
            "method": request.method,
            "path": path,
            # Who called, when the webhook acts as the calling user and the token says.
            "user": user_of_credential(user_token),
        }
        dedupe = None
        if webhook.dedupe is not None:
            try:
                key = to_text(render(webhook.dedupe.key, {**names, "trigger": trigger}))
            except ExpressionError as exc:
                # A sender that omits its delivery id still gets its run, just no dedupe.
                log.info("no dedupe key for /hooks/%s: %s", path, exc.message)
                key = ""
            if key:
                dedupe = Dedupe(f"webhook:{route.flow}", key, webhook.dedupe.for_)
        try:
            submitted = await self.dispatcher.submit(
                route.flow,
                trigger,
                None,
                user_token,
                dedupe,
                caller_waits=webhook.respond == "wait",
            )
        except FlowrunnerError as exc:
            raise Refused(503, exc.message) from None
        return await self.answer(request, headers, submitted, webhook)

    def authenticate(
        self, headers: dict[str, str], raw: bytes, webhook: Webhook, names: dict[str, Any]
    ) -> str | None:
        auth = webhook.auth
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
        self, request: Request, headers: dict[str, str], submitted: Submitted, webhook: Webhook
    ) -> Response:
        status_url = status_url_of(request, submitted.run_id, headers.get("host"))
        body: dict[str, Any] = {"run_id": submitted.run_id, "status_url": status_url}
        if submitted.status in (RunStatus.SKIPPED, RunStatus.FAILED):
            return JSONAnswer(
                {**body, "status": submitted.status, "reason": submitted.reason},
                status_code=409 if submitted.status == RunStatus.FAILED else 200,
            )
        if webhook.respond == "immediate":
            extra = {"duplicate": True} if submitted.status == "duplicate" else {}
            return JSONAnswer({**body, "status": "queued", **extra}, status_code=202)
        record = await self.dispatcher.wait_for(submitted.run_id, webhook.timeout.total_seconds())
        if record is None:
            try:
                await self.dispatcher.stored(submitted.run_id)
            except Exception as exc:
                log.error("run %s could not be stored: %s", submitted.run_id, exc)
                raise Refused(503, "the run could not be stored; try again") from None
            return JSONAnswer({**body, "status": "running"}, status_code=202)
        return run_answer(record, body)


# The status URL up to the run id, by how the request reached us (scheme, Host header,
# root path): Starlette's url_for walks the routes and builds URL objects, ~60 us a time.
_STATUS_PREFIXES: dict[tuple[Any, ...], str] = {}
_STATUS_PREFIXES_MAX = 64  # Host is the caller's to choose: the cache stays bounded


def status_url_of(request: Request, run_id: str, host: str | None) -> str:
    scope = request.scope
    key = (scope.get("scheme"), scope.get("root_path"), scope.get("server"), host)
    prefix = _STATUS_PREFIXES.get(key)
    if prefix is None:
        if len(_STATUS_PREFIXES) >= _STATUS_PREFIXES_MAX:
            _STATUS_PREFIXES.clear()
        marker = "0-run-id"
        prefix = str(request.url_for("run_status", run_id=marker)).removesuffix(marker)
        _STATUS_PREFIXES[key] = prefix
    return prefix + run_id


def run_answer(record: RunRecord, body: dict[str, Any]) -> Response:
    """The `respond` step's answer, else a summary of the run."""
    if record.response:
        response = record.response
        headers = {str(k): str(v) for k, v in (response.get("headers") or {}).items()}
        if "json" in response:
            return JSONAnswer(response["json"], status_code=response["status"], headers=headers)
        return Response(
            str(response.get("body") or ""), status_code=response["status"], headers=headers
        )
    summary = {**body, "status": record.status}
    if record.status == RunStatus.SUCCEEDED:
        return JSONAnswer({**summary, "outputs": record.outputs}, status_code=200)
    return JSONAnswer({**summary, "error": record.error}, status_code=500)


async def read_limited(request: Request, limit: int, headers: dict[str, str]) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
