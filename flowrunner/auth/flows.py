"""Auth flows for credentials that can fail in interesting ways.

Each is a :class:`flowrunner.wire.WireAuth` whose ``exchange`` applies the credential,
sends the request and reads the answer, so a 401 can trigger one forced refresh and one
resend, and a refusal can be turned into a message a human can act on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Protocol

from flowrunner.auth.errors import (
    AuthError,
    PermissionDenied,
    TokenRejected,
    regenerate_instructions,
)
from flowrunner.secrets import Masker
from flowrunner.store.tokens import Credential
from flowrunner.wire import Wire, WireAuth, WireRequest, WireResponse


class Upkeep:
    """Keeps a profile's status current from the responses its credential got (all but
    those its auth turns into an error first). ``observe`` does the work; until the
    monotonic moment ``quiet_until`` a success has nothing to change (the status is known
    to be ok and the last use was recorded a moment ago), so that the usual answer costs
    the auth a clock read and a comparison. 0 when the next answer must be observed."""

    __slots__ = ("observe", "quiet_until")

    def __init__(self, observe: Callable[[WireResponse], None]) -> None:
        self.observe = observe
        self.quiet_until = 0.0

    def __call__(self, response: WireResponse) -> None:
        if response.status_code >= 400 or time.monotonic() >= self.quiet_until:
            self.observe(response)


class TokenSource(Protocol):
    """What the requests of one oauth2 or session profile share."""

    upkeep: Upkeep

    def current(self, masker: Masker) -> Credential | None:
        """The cached token while it is usable (registered with ``masker``), else None."""
        ...

    def get(self, masker: Masker, rejected: str | None) -> Awaitable[Credential]:
        """A valid token, obtained or refreshed if needed; ``rejected`` is one the API
        just refused with 401."""
        ...

    def headers(self, credential: Credential, masker: Masker) -> Iterable[tuple[str, str]]:
        """The headers that carry ``credential``."""
        ...


class RefreshingAuth(WireAuth):
    """oauth2 and session profiles: a token from the TokenManager, refreshed once on 401."""

    __slots__ = ("masker", "source")

    def __init__(self, source: TokenSource, masker: Masker) -> None:
        self.source = source
        self.masker = masker

    async def exchange(self, wire: Wire, request: WireRequest, body_limit: int) -> WireResponse:
        source, masker = self.source, self.masker
        credential = source.current(masker) or await source.get(masker, None)
        headers = request.headers
        for name, value in source.headers(credential, masker):
            headers[name] = value
        response = await wire.send(request, body_limit)
        if response.status_code == 401:
            fresh = await source.get(masker, credential.access_token)
            if fresh.access_token != credential.access_token:
                for name, value in source.headers(fresh, masker):
                    headers[name] = value
                response = await wire.send(request, body_limit)
        upkeep = source.upkeep
        if response.status_code >= 400 or time.monotonic() >= upkeep.quiet_until:
            upkeep.observe(response)
        return response


class BearerAuth(WireAuth):
    """A token that cannot be refreshed: expiry checked before sending, 401 means revoked.

    Holds nothing of a run: one is built per profile and token, and serves every request
    until the token changes."""

    __slots__ = (
        "_expires_ts",
        "clock",
        "expires_at",
        "header",
        "on_rejected",
        "profile",
        "upkeep",
        "value",
        "wall",
    )

    def __init__(
        self,
        profile: str,
        header: str,
        value: str,
        expires_at: datetime | None,
        on_rejected: Callable[[], None],
        upkeep: Upkeep,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        wall: Callable[[], float] | None = None,
    ) -> None:
        """``wall``, when ``clock`` is the system's, is ``time.time``: the expiry is then
        compared as a timestamp, without building a datetime for every request."""
        self.profile = profile
        self.header = header
        self.value = value
        self.expires_at = expires_at
        self.on_rejected = on_rejected
        self.upkeep = upkeep
        self.clock = clock
        self.wall = wall
        self._expires_ts = expires_at.timestamp() if expires_at is not None else 0.0

    def expired(self) -> bool:
        if self.expires_at is None:
            return False
        if self.wall is not None:
            return self._expires_ts <= self.wall()
        return self.expires_at <= self.clock()

    async def exchange(self, wire: Wire, request: WireRequest, body_limit: int) -> WireResponse:
        expires_at = self.expires_at
        if expires_at is not None and self.expired():
            raise AuthError(
                self.profile,
                f"the token expired on {expires_at:%Y-%m-%d %H:%M} UTC. "
                + regenerate_instructions(self.profile),
            )
        request.headers[self.header] = self.value
        response = await wire.send(request, body_limit)
        if response.status_code == 401:
            self.on_rejected()
            until = f" although it is valid until {expires_at:%Y-%m-%d}" if expires_at else ""
            raise TokenRejected(
                self.profile,
                f"the API refused the token with 401{until}: it was revoked or regenerated. "
                + regenerate_instructions(self.profile),
            )
        upkeep = self.upkeep
        if response.status_code >= 400 or time.monotonic() >= upkeep.quiet_until:
            upkeep.observe(response)
        return response


class ConnectedUserAuth(WireAuth):
    """The triggering user's token; a 403 is that user's missing permission, never refreshed."""

    __slots__ = ("header", "profile", "upkeep", "user", "value")

    def __init__(
        self, profile: str, header: str, value: str, user: str | None, upkeep: Upkeep
    ) -> None:
        self.profile = profile
        self.header = header
        self.value = value
        self.user = user
        self.upkeep = upkeep

    async def exchange(self, wire: Wire, request: WireRequest, body_limit: int) -> WireResponse:
        request.headers[self.header] = self.value
        response = await wire.send(request, body_limit)
        self.upkeep(response)
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
        return response
