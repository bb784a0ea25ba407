"""Auth flows for credentials that can fail in interesting ways.

Written as async generator flows (see :class:`flowrunner.wire.WireAuth`), so a 401 can
trigger one forced refresh and one resend, and a refusal can be turned into a message a
human can act on.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime

from flowrunner.auth.errors import (
    AuthError,
    PermissionDenied,
    TokenRejected,
    regenerate_instructions,
)
from flowrunner.store.tokens import Credential
from flowrunner.wire import WireAuth, WireRequest, WireResponse

Observe = Callable[[WireResponse], Awaitable[None]]


class RefreshingAuth(WireAuth):
    """oauth2 and session profiles: a token from the TokenManager, refreshed once on 401."""

    def __init__(
        self,
        get: Callable[[str | None], Awaitable[Credential]],
        headers: Callable[[Credential], dict[str, str]],
        observe: Observe,
    ) -> None:
        self.get = get
        self.headers = headers
        self.observe = observe

    async def auth_flow(self, request: WireRequest) -> AsyncGenerator[WireRequest, WireResponse]:
        credential = await self.get(None)
        for name, value in self.headers(credential).items():
            request.headers[name] = value
        response = yield request
        if response.status_code == 401:
            fresh = await self.get(credential.access_token)
            if fresh.access_token != credential.access_token:
                for name, value in self.headers(fresh).items():
                    request.headers[name] = value
                response = yield request
        await self.observe(response)


class BearerAuth(WireAuth):
    """A token that cannot be refreshed: expiry checked before sending, 401 means revoked."""

    def __init__(
        self,
        profile: str,
        header: str,
        value: str,
        expires_at: datetime | None,
        on_rejected: Callable[[], Awaitable[None]],
        observe: Observe,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.profile = profile
        self.header = header
        self.value = value
        self.expires_at = expires_at
        self.on_rejected = on_rejected
        self.observe = observe
        self.clock = clock

    async def auth_flow(self, request: WireRequest) -> AsyncGenerator[WireRequest, WireResponse]:
        if self.expires_at is not None and self.expires_at <= self.clock():
            raise AuthError(
                self.profile,
                f"the token expired on {self.expires_at:%Y-%m-%d %H:%M} UTC. "
                + regenerate_instructions(self.profile),
            )
        request.headers[self.header] = self.value
        response = yield request
        if response.status_code == 401:
            await self.on_rejected()
            until = (
                f" although it is valid until {self.expires_at:%Y-%m-%d}"
                if (self.expires_at)
                else ""
            )
            raise TokenRejected(
                self.profile,
                f"the API refused the token with 401{until}: it was revoked or regenerated. "
                + regenerate_instructions(self.profile),
            )
        await self.observe(response)


class ConnectedUserAuth(WireAuth):
    """The triggering user's token; a 403 is that user's missing permission, never refreshed."""

    def __init__(
        self, profile: str, header: str, value: str, user: str | None, observe: Observe
    ) -> None:
        self.profile = profile
        self.header = header
        self.value = value
        self.user = user
        self.observe = observe

    async def auth_flow(self, request: WireRequest) -> AsyncGenerator[WireRequest, WireResponse]:
        request.headers[self.header] = self.value
        response = yield request
        await self.observe(response)
        if response.status_code == 403:
            detail = response.text[:200].strip()
            who = f"user {self.user}" if self.user else "the connected user"
            raise PermissionDenied(
                self.profile,
                f"{who} is not allowed to {request.method} {request.url.with_query(None)}"
                f" (403{': ' + detail if detail else ''}). Support should check the user's "
                "roles, and that the user can do this action by hand in the application",
            )
        if response.status_code == 401:
            who = f"user {self.user}" if self.user else "the connected user"
            raise AuthError(
                self.profile,
                f"the API refused {who}'s token with 401: the user must log in again",
            )
