"""Obtaining and refreshing tokens, once at a time per profile, across processes.

The rules, each because an integration died of breaking it somewhere else:

- A token is refreshed ahead of its expiry (a margin, default 5 minutes), not after a 401.
- One refresh at a time per profile: an ``asyncio.Lock`` within the process, a lease in
  the state database across processes. Whoever waited re-reads the store and uses the
  token the winner stored.
- A single-use refresh token is marked *spent* in the store before it is sent; the new
  one is committed before the new access token is used. A process killed in between
  leaves a spent token that is never sent again: the profile logs in with its password
  grant when it has one, and otherwise asks a human (``needs_login``).
- A token response without a refresh token keeps the old one; a 200 without an access
  token changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from flowrunner.auth.errors import AuthError, NeedsLogin, TokenEndpointBusy
from flowrunner.secrets import MIN_SECRET_LENGTH, MaskingFilter
from flowrunner.store.tokens import Credential, ProfileStatus, TokenStore

log = logging.getLogger("flowrunner.auth")
log.addFilter(MaskingFilter())  # the running flow's secrets, should a message quote one

LEASE_LENGTH = timedelta(seconds=60)
LEASE_POLL_SECONDS = 0.05
LEASE_WAIT_SECONDS = 90.0
CLOCK_SKEW = timedelta(seconds=30)
# After a refresh ahead of expiry met a busy token endpoint, the still-valid token is used
# for this long before the next attempt, so that every request does not wait on back-offs.
BUSY_PAUSE_SECONDS = 30.0
NEVER = datetime.max.replace(tzinfo=UTC)  # usable until: a token of unknown expiry
ALREADY = datetime.min.replace(tzinfo=UTC)  # usable until: no usable token


class InvalidGrant(Exception):
    """The token endpoint refused the grant (``invalid_grant``): that credential is dead."""


@dataclass(frozen=True)
class Grant:
    """One way to obtain a token: a refresh, a password login, a session login..."""

    name: str
    send: Callable[[], Awaitable[dict[str, Any]]]
    refresh_token: str | None = None  # the single-use token this grant consumes, if any


Obtain = Callable[[Credential | None], list[Grant]]
Parse = Callable[[dict[str, Any], Credential | None, datetime], Credential]


class TokenManager:
    """Hands out valid credentials for refreshable profiles (oauth2, session)."""

    def __init__(
        self,
        store: TokenStore,
        clock: Callable[[], datetime] | None = None,
        holder: str | None = None,
    ) -> None:
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))
        self.holder = holder or lease_holder_id()
        self._cache: dict[str, Credential] = {}
        # The token held for a profile, usable or not (a plain dict lookup: it is read
        # for every request of an oauth2 or session profile).
        self.cached: Callable[[str], Credential | None] = self._cache.get
        self._locks: dict[str, asyncio.Lock] = {}
        self._busy_until: dict[str, float] = {}
        self.refresh_count = 0

    def forget(self, profile: str) -> None:
        self._cache.pop(profile, None)

    def usable(self, credential: Credential | None, margin: timedelta) -> bool:
        return self.clock() < usable_until(credential, margin)

    async def credential(
        self,
        profile: str,
        obtain: Obtain,
        parse: Parse,
        margin: timedelta,
        *,
        rejected: str | None = None,
    ) -> Credential:
        """A credential valid for at least ``margin``; ``rejected`` is a token the API just
        refused with 401, which forces a refresh unless someone already replaced it."""
        current = self._cache.get(profile)
        if rejected is None and (self.usable(current, margin) or self._resting(profile, current)):
            assert current is not None  # noqa: S101 - narrowed by usable()
            return current
        lock = self._locks.setdefault(profile, asyncio.Lock())
        async with lock:
            current = self._cache.get(profile)
            if self._fresh_enough(current, margin, rejected) or (
                rejected is None and self._resting(profile, current)
            ):
                assert current is not None  # noqa: S101 - narrowed by _fresh_enough()
                return current
            await self._take_lease(profile)
            try:
                stored = self.store.load(profile)
                if self._fresh_enough(stored, margin, rejected):
                    assert stored is not None  # noqa: S101 - narrowed by _fresh_enough()
                    self._cache[profile] = stored
                    return stored
                try:
                    fresh = await self._obtain(profile, stored, obtain, parse)
                except TokenEndpointBusy:
                    # A refresh ahead of expiry can wait: the current token still works.
                    if rejected is None and self.usable(stored, timedelta(0)):
                        assert stored is not None  # noqa: S101 - narrowed by usable()
                        log.warning(
                            "auth profile %s: the token endpoint is busy; the current token "
                            "is used until %s",
                            profile,
                            stored.access_expires_at,
                        )
                        loop = asyncio.get_running_loop()
                        self._busy_until[profile] = loop.time() + BUSY_PAUSE_SECONDS
                        self._cache[profile] = stored
                        return stored
                    raise
                self._busy_until.pop(profile, None)
                self._cache[profile] = fresh
                return fresh
            finally:
                self.store.release_lease(profile, self.holder)

    def _resting(self, profile: str, credential: Credential | None) -> bool:
        """The token endpoint was busy a moment ago and this token is still valid."""
        until = self._busy_until.get(profile)
        if until is None or asyncio.get_running_loop().time() >= until:
            return False
        return self.usable(credential, timedelta(0))

    def _fresh_enough(
        self, credential: Credential | None, margin: timedelta, rejected: str | None
    ) -> bool:
        if not self.usable(credential, margin):
            return False
        assert credential is not None  # noqa: S101 - narrowed by usable()
        return rejected is None or credential.access_token != rejected

    async def _take_lease(self, profile: str) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + LEASE_WAIT_SECONDS
        while not self.store.try_lease(profile, self.holder, self.clock(), LEASE_LENGTH):
            holder = self.store.lease_holder(profile)
            if holder is not None and _holder_died(holder):
                # Killed in the middle of a refresh: its lease need not run out. What it
                # was refreshing is in the store (a spent refresh token is never resent).
                log.warning("auth profile %s: taking over the lease of a dead process", profile)
                self.store.release_lease(profile, holder)
                continue
            if loop.time() > give_up:
                raise TokenEndpointBusy(
                    profile, "another process has been refreshing this token for too long"
                )
            await asyncio.sleep(LEASE_POLL_SECONDS)

    async def _obtain(
        self, profile: str, stored: Credential | None, obtain: Obtain, parse: Parse
    ) -> Credential:
        grants = obtain(stored)
        if not grants:
            self._record_status(
                profile, stored, ProfileStatus.NEEDS_LOGIN, "no credential left to obtain a token"
            )
            raise NeedsLogin(profile, _needs_login_help(profile))
        last_problem = "no grant succeeded"
        for grant in grants:
            if grant.refresh_token is not None:
                # Durably spent before it leaves the process: never sent twice.
                spent = replace(stored or Credential(profile), refresh_token_spent=True)
                self.store.save(spent)
                stored = spent
            try:
                data = await grant.send()
            except InvalidGrant as exc:
                last_problem = f"{grant.name} was refused ({exc})"
                log.warning("auth profile %s: %s", profile, last_problem)
                continue
            except TokenEndpointBusy as busy:
                if (
                    grant.refresh_token is not None
                    and stored is not None
                    and getattr(busy, "unsent", False)
                ):
                    stored = replace(stored, refresh_token_spent=False)
                    self.store.save(stored)
                raise
            now = self.clock()
            if not isinstance(data.get("access_token"), str) or not data["access_token"]:
                raise AuthError(
                    profile,
                    f"the token endpoint answered {grant.name} without an access token; "
                    "the stored tokens are unchanged",
                )
            fresh = parse(data, stored, now)
            kept = stored.refresh_token if stored is not None else None
            if (
                fresh.refresh_token is not None
                and fresh.refresh_token == kept
                and stored is not None
                and stored.refresh_token_spent
                and grant.refresh_token != kept
            ):
                # Another grant succeeded without a new refresh token: the old one was
                # refused or lost, never to be sent again.
                fresh = replace(fresh, refresh_token=None, refresh_expires_at=None)
            if fresh.refresh_token is None and grant.refresh_token is not None:
                # The answer did not rotate the refresh token this grant sent: it stays good.
                fresh = replace(fresh, refresh_token=grant.refresh_token)
            # A rotated refresh token is new; one the answer omitted was not consumed.
            fresh = replace(
                fresh,
                status=ProfileStatus.OK,
                last_error=None,
                last_refreshed_at=now,
                refresh_token_spent=False,
            )
            self.store.save(fresh)
            self.refresh_count += 1
            log.info(
                "auth profile %s: new token via %s (fingerprint %s)",
                profile,
                grant.name,
                fresh.fingerprint,
            )
            return fresh
        self._record_status(profile, stored, ProfileStatus.NEEDS_LOGIN, last_problem)
        raise NeedsLogin(profile, f"{last_problem}. {_needs_login_help(profile)}")

    def _record_status(
        self, profile: str, stored: Credential | None, status: str, error: str
    ) -> None:
        credential = replace(stored or Credential(profile), status=status, last_error=error)
        self.store.save(credential)
        self._cache.pop(profile, None)


def usable_until(credential: Credential | None, margin: timedelta) -> datetime:
    """The moment from which ``credential`` must no longer be used, ``margin`` ahead of its
    expiry: ``NEVER`` for a token of unknown expiry, ``ALREADY`` for one that is missing,
    spent or refused. It depends on the credential alone, which is never changed in place
    (a new one replaces it), so it can be worked out once per credential."""
    if credential is None or not credential.access_token:
        return ALREADY
    if credential.status in (ProfileStatus.NEEDS_LOGIN, ProfileStatus.REJECTED):
        return ALREADY
    expires = credential.access_expires_at
    if expires is None:
        return NEVER
    if credential.issued_at is not None:
        # A margin as long as the token's life would refresh it on every request: at
        # most half of that life is spent waiting for the refresh.
        margin = max(timedelta(0), min(margin, (expires - credential.issued_at) / 2))
    return expires - margin


def lease_holder_id() -> str:
    """``host:pid:random``: unique, and tells a process on the same host whether the
    holder of a lease is still alive."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _holder_died(holder: str) -> bool:
    """The holder was a process of this host that no longer exists."""
    if os.name != "posix":
        return False
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname()[:40] or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def _needs_login_help(profile: str) -> str:
    return (
        "A human must provide a new credential: put a new refresh token or password in the "
        f"profile's secrets, then run 'flowrunner profiles check {profile}'"
    )


def parse_expires_in(value: Any) -> timedelta | None:
    """``expires_in`` as APIs really send it: 7200, "7200", "7200.0", missing or 0."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return timedelta(seconds=seconds) if seconds > 0 else None


def parse_expiry(value: Any) -> datetime | None:
    """An absolute expiry: epoch seconds or an ISO 8601 date or date-time."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def post_token_request(
    client: httpx.AsyncClient,
    profile: str,
    build: Callable[[], httpx.Request],
    *,
    attempts: int = 3,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> dict[str, Any]:
    """Send a token request; classify the answer. 429/5xx/network: back off, then give up
    with TokenEndpointBusy (stored tokens stay); invalid_grant: InvalidGrant."""
    from flowrunner.steps.http import retry_after_seconds

    problem = "no answer"
    for attempt in range(1, attempts + 1):
        request = build()
        try:
            response = await client.send(request)
        except httpx.ConnectError as exc:
            problem = f"cannot reach the token endpoint ({type(exc).__name__})"
            busy = TokenEndpointBusy(profile, problem)
            busy.unsent = True  # type: ignore[attr-defined]
            if attempt == attempts:
                raise busy from None
            await sleep(min(2.0**attempt, 10.0))
            continue
        except httpx.TransportError as exc:
            # The request may have reached the server: a refresh token sent is spent.
            raise TokenEndpointBusy(
                profile, f"the token endpoint did not answer ({type(exc).__name__})"
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        error = str(data.get("error", ""))
        if response.status_code == 429 or response.status_code >= 500:
            problem = f"the token endpoint answered {response.status_code}"
            if attempt == attempts:
                busy = TokenEndpointBusy(profile, problem + "; the stored tokens are kept")
                busy.unsent = True  # type: ignore[attr-defined]
                raise busy
            delay = retry_after_seconds(response.headers.get("retry-after"))
            await sleep(min(delay if delay is not None else 2.0**attempt, 30.0))
            continue
        if response.status_code >= 400:
            description = str(data.get("error_description", "")) or response.text[:200]
            # Endpoints quote what they refused ("refresh token abc... already used").
            description = _scrub(description, request)
            error = _scrub(error, request)
            if error in ("invalid_grant", "invalid_token") or response.status_code in (400, 401):
                raise InvalidGrant(f"{response.status_code} {error or ''} {description}".strip())
            raise AuthError(
                profile,
                f"the token endpoint answered {response.status_code}: "
                f"{error} {description}".strip(),
            )
        return data
    raise TokenEndpointBusy(profile, problem)


# Fields of a token request that are not secret; every other value sent is.
_NOT_SECRET = frozenset(
    {"grant_type", "scope", "client_id", "username", "redirect_uri", "audience", "resource"}
)


def _scrub(text: str, request: httpx.Request) -> str:
    """``text`` without any secret value the request carried (body fields, query
    parameters, Basic credentials)."""
    values: list[str] = []
    fields: dict[str, Any] = {}
    content_type = request.headers.get("content-type", "")
    try:
        if "json" in content_type:
            parsed = json.loads(request.content or b"{}")
            fields = parsed if isinstance(parsed, dict) else {}
        elif "form" in content_type:
            fields = dict(httpx.QueryParams(request.content.decode()))
    except (ValueError, UnicodeDecodeError):
        fields = {}
    fields |= dict(request.url.params)
    values += [v for k, v in fields.items() if k not in _NOT_SECRET and isinstance(v, str)]
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            values.append(base64.b64decode(credentials).decode().partition(":")[2])
        except (ValueError, UnicodeDecodeError):
            pass
    for value in sorted(values, key=len, reverse=True):
        if len(value) >= MIN_SECRET_LENGTH:
            text = text.replace(value, "***")
    return text
