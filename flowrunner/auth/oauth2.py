"""OAuth2 profiles: the grants to try, in order, and how to read a token answer."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
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
from flowrunner.model import OAuth2Profile
from flowrunner.store.tokens import Credential, fingerprint

# Fingerprint of the configured refresh token once it has been used.
SEED_KEY = "_seed"
# Where a grant notes the refresh token it sent (a key name, not a token).
USED_REFRESH_TOKEN = "__used_refresh_token"  # noqa: S105


class OAuth2Grants:
    def __init__(
        self,
        profile: OAuth2Profile,
        client: httpx.AsyncClient,
        render: Callable[[Any], Any],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.profile = profile
        self.client = client
        self.render = render
        self.clock = clock

    def _value(self, template: str | None) -> str | None:
        return to_text(self.render(template)) if template is not None else None

    def grants(self, stored: Credential | None) -> list[Grant]:
        """Refresh when a live refresh token exists; then the profile's own grant."""
        profile = self.profile
        grants: list[Grant] = []
        now_ok = stored is not None and stored.refresh_token and not stored.refresh_token_spent
        lapsed = (
            stored is not None
            and stored.refresh_expires_at is not None
            and stored.refresh_expires_at <= self.clock()
        )
        if now_ok and not lapsed and profile.grant != "client_credentials":
            assert stored is not None and stored.refresh_token  # noqa: S101 - checked above
            token = stored.refresh_token
            grants.append(
                self._grant(
                    "refresh", {"grant_type": "refresh_token", "refresh_token": token}, token
                )
            )
        if profile.grant == "password":
            grants.append(
                self._grant(
                    "password login",
                    {
                        "grant_type": "password",
                        "username": self._value(profile.username),
                        "password": self._value(profile.password),
                    },
                )
            )
        elif profile.grant == "client_credentials":
            grants.append(self._grant("client credentials", {"grant_type": "client_credentials"}))
        else:
            seed = self._value(profile.refresh_token)
            used = stored.extra.get(SEED_KEY) if stored else None
            # The configured refresh token is used once; a new one put in the secrets
            # (a different fingerprint) is the human's way out of needs_login.
            if seed and fingerprint(seed) != used:
                grants.append(
                    self._grant(
                        "configured refresh token",
                        {"grant_type": "refresh_token", "refresh_token": seed},
                        seed,
                    )
                )
        return grants

    def _grant(self, name: str, fields: dict[str, Any], refresh_token: str | None = None) -> Grant:
        profile = self.profile
        client_id = self._value(profile.client_id)
        client_secret = self._value(profile.client_secret)
        scope = self._value(profile.scope)

        def build() -> httpx.Request:
            body = {k: v for k, v in fields.items() if v is not None}
            headers = {"Accept": "application/json"}
            if profile.client_auth == "basic" and client_id is not None:
                pair = f"{client_id}:{client_secret or ''}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
            else:
                if client_id is not None:
                    body["client_id"] = client_id
                if client_secret is not None:
                    body["client_secret"] = client_secret
            if scope:
                body["scope"] = scope
            if profile.body_format == "json":
                return self.client.build_request(
                    "POST",
                    profile.token_url,
                    content=json.dumps(body).encode(),
                    headers={**headers, "Content-Type": "application/json"},
                )
            return self.client.build_request("POST", profile.token_url, data=body, headers=headers)

        async def send() -> dict[str, Any]:
            data = await post_token_request(self.client, profile.name, build)
            if name == "configured refresh token" and refresh_token:
                data[f"__{SEED_KEY}"] = fingerprint(refresh_token)
            if refresh_token:
                # A server that does not rotate (SuperOffice) omits the refresh token from
                # its answer: the one just used stays the one to use next time.
                data[USED_REFRESH_TOKEN] = refresh_token
            return data

        return Grant(name, send, refresh_token)

    def parse(self, data: dict[str, Any], stored: Credential | None, now: datetime) -> Credential:
        profile = self.profile
        lifetime = parse_expires_in(data.get("expires_in"))
        expires_at = now + lifetime - CLOCK_SKEW if lifetime else None
        for name in ("expires_at", "expires_on", ".expires"):
            if expires_at is None and data.get(name) is not None:
                expires_at = parse_expiry(data.get(name))
        new_refresh = data.get("refresh_token")
        refresh_token = (
            new_refresh
            if isinstance(new_refresh, str) and new_refresh
            else data.get(USED_REFRESH_TOKEN) or (stored.refresh_token if stored else None)
        )
        refresh_expires_at = stored.refresh_expires_at if stored and not new_refresh else None
        refresh_lifetime = parse_expires_in(data.get("refresh_token_expires_in"))
        if new_refresh:
            if refresh_lifetime:
                refresh_expires_at = now + refresh_lifetime
            elif profile.refresh_token_lifetime:
                refresh_expires_at = now + profile.refresh_token_lifetime
        extra = {
            name: compile_jsonpath(path).values(data) for name, path in profile.capture.items()
        }
        previous_seed = stored.extra.get(SEED_KEY) if stored else None
        seed = data.get(f"__{SEED_KEY}") or previous_seed
        if seed:
            extra[SEED_KEY] = seed
        return Credential(
            profile=profile.name,
            access_token=str(data["access_token"]),
            access_expires_at=expires_at,
            refresh_token=refresh_token,
            refresh_expires_at=refresh_expires_at,
            extra=extra,
            issued_at=now,
        )
