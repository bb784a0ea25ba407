"""Session profiles: a login request whose answer is a token with a lifetime
(Tripletex's session token; webCRM's JWT with its refresh token)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from flowrunner.auth.tokens import (
    CLOCK_SKEW,
    Grant,
    parse_expires_in,
    parse_expiry,
    post_token_request,
)
from flowrunner.expressions import to_text
from flowrunner.jsonpaths import compile_jsonpath
from flowrunner.model import SessionProfile
from flowrunner.model.profiles import LoginRequest
from flowrunner.store.tokens import Credential


class SessionGrants:
    def __init__(
        self,
        profile: SessionProfile,
        client: httpx.AsyncClient,
        render: Callable[[Any, dict[str, Any]], Any],
    ) -> None:
        self.profile = profile
        self.client = client
        self.render = render

    def grants(self, stored: Credential | None) -> list[Grant]:
        profile = self.profile
        grants: list[Grant] = []
        if (
            profile.refresh is not None
            and stored is not None
            and stored.refresh_token
            and not stored.refresh_token_spent
        ):
            names = {
                "token": {
                    "access_token": stored.access_token,
                    "refresh_token": stored.refresh_token,
                    **stored.extra,
                }
            }
            grants.append(
                self._grant("session refresh", profile.refresh, names, stored.refresh_token)
            )
        grants.append(self._grant("login", profile.login, {}))
        return grants

    def _grant(
        self, name: str, spec: LoginRequest, names: dict[str, Any], refresh: str | None = None
    ) -> Grant:
        def build() -> httpx.Request:
            query = {k: to_text(v) for k, v in self.render(spec.query, names).items()}
            headers = {k: to_text(v) for k, v in self.render(spec.headers, names).items()}
            headers.setdefault("Accept", "application/json")
            content: bytes | None = None
            if "json_" in spec.model_fields_set:
                content = json.dumps(self.render(spec.json_, names)).encode()
                headers["Content-Type"] = "application/json"
            elif spec.form is not None:
                form = {k: to_text(v) for k, v in self.render(spec.form, names).items()}
                content = str(httpx.QueryParams(form)).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            return self.client.build_request(
                spec.method,
                to_text(self.render(spec.url, names)),
                params=query or None,
                headers=headers,
                content=content,
            )

        async def send() -> dict[str, Any]:
            data = await post_token_request(self.client, self.profile.name, build)
            token = compile_jsonpath(self.profile.token).values(data)
            return {"access_token": token if isinstance(token, str) else None, "raw": data}

        return Grant(name, send, refresh)

    def parse(self, data: dict[str, Any], stored: Credential | None, now: datetime) -> Credential:
        profile = self.profile
        raw = data["raw"]

        def find(path: str | None) -> Any:
            return compile_jsonpath(path).values(raw) if path else None

        expires_at: datetime | None = None
        lifetime = parse_expires_in(find(profile.expires_in))
        if lifetime:
            expires_at = now + lifetime - CLOCK_SKEW
        elif profile.expires_at:
            expires_at = parse_expiry(find(profile.expires_at))
        elif profile.lifetime:
            expires_at = now + profile.lifetime - CLOCK_SKEW
        new_refresh = find(profile.refresh_token)
        refresh_token = (
            new_refresh
            if isinstance(new_refresh, str) and new_refresh
            else (stored.refresh_token if stored else None)
        )
        extra = {name: find(path) for name, path in profile.capture.items()}
        return Credential(
            profile=profile.name,
            access_token=str(data["access_token"]),
            access_expires_at=expires_at,
            refresh_token=refresh_token,
            refresh_expires_at=stored.refresh_expires_at if stored and not new_refresh else None,
            extra=extra,
            issued_at=now,
        )
