"""Finds a step's auth profile and turns it into the auth flow that applies it."""

from __future__ import annotations

import base64
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx

from flowrunner.auth import jwt
from flowrunner.auth.errors import AuthError
from flowrunner.auth.flows import BearerAuth, ConnectedUserAuth, RefreshingAuth, Upkeep
from flowrunner.auth.oauth2 import SEED_KEY, OAuth2Grants
from flowrunner.auth.session import SessionGrants
from flowrunner.auth.static import HeaderAuth, QueryAuth
from flowrunner.auth.tokens import ALREADY, TokenManager, usable_until
from flowrunner.errors import ConfigurationError, ExpressionError
from flowrunner.expressions import render, to_text
from flowrunner.loader import Project
from flowrunner.model import (
    ApiKeyProfile,
    BasicProfile,
    BearerProfile,
    ConnectedUserProfile,
    OAuth2Profile,
    ProfileBase,
    SessionProfile,
)
from flowrunner.runtime import RunContext, StepFailed
from flowrunner.secrets import Masker, SecretStore
from flowrunner.store.tokens import Credential, ProfileStatus, TokenStore, fingerprint
from flowrunner.wire import WireAuth, WireResponse

log = logging.getLogger("flowrunner.auth")
TOUCH_EVERY_SECONDS = 60.0
BEARER_REREAD_SECONDS = 5.0
DEFAULT_HEADERS = {"Authorization": "Bearer ${{ token.access_token }}"}
REFRESHABLE = (OAuth2Profile, SessionProfile)
ONE_SECRET = re.compile(r"\$\{\{\s*secrets\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\s*")
NEVER = datetime.max.replace(tzinfo=UTC)  # the expiry of a token that has none
REVOKED_KEY = "revoked"  # bearer: fingerprints of the tokens refused with 401
_OK: str = ProfileStatus.OK  # read as a constant: an enum's attribute costs more


class ProfileAuth:
    """The engine's AuthProvider for the profiles of one project.

    What a profile's requests share is worked out once per version of the profile and
    per credential, not once per request: an oauth2 or session profile's token source
    (the header and the values to mask for the token in the TokenManager's cache, and
    the moment it must be refreshed), a bearer profile's auth (rebuilt when the
    configured or the stored token changes, or one is refused). The profiles of a
    reloaded project are worked out again; tokens and statuses are kept by name."""

    def __init__(
        self,
        project: Project,
        secrets: SecretStore,
        store: TokenStore,
        client: httpx.AsyncClient,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.secrets = secrets
        self.store = store
        self.client = client
        self.clock = clock or (lambda: datetime.now(UTC))
        # With the system's clock, a request compares an expiry as a POSIX timestamp with
        # time.time(): the same instant, read for a fraction of datetime.now(UTC)'s cost.
        self.wall: Callable[[], float] | None = time.time if clock is None else None
        self.tokens = TokenManager(store, self.clock)
        self._status: dict[str, str] = {}
        self._touched: dict[str, float] = {}
        self._bearer_cache: dict[str, tuple[float, Credential | None]] = {}
        self._sources: dict[str, _TokenSource] = {}
        self._bearers: dict[str, _Bearer] = {}
        self._upkeeps: dict[str, Upkeep] = {}
        self.project = project

    @property
    def project(self) -> Project:
        return self._project

    @project.setter
    def project(self, project: Project) -> None:
        """A (re)loaded project: what was worked out for the previous one is dropped."""
        self._project = project
        self._sources.clear()
        self._bearers.clear()

    def profile(self, name: str) -> ProfileBase:
        loaded = self._project.profiles.get(name)
        if loaded is None:
            raise StepFailed(f"auth profile '{name}' is not loaded (see flowrunner validate)")
        return loaded.profile

    def _names(self, masker: Masker) -> dict[str, Any]:
        return {"secrets": self.secrets.view(masker)}

    async def auth_for(self, name: str, run: RunContext) -> WireAuth:
        profile = self.profile(name)
        masker = run.masker
        # What this version of the profile already shares with earlier requests comes
        # first: no isinstance on the way (a miss on a model class is an ABC check).
        source = self._sources.get(name)
        if source is not None and source.profile is profile:
            return RefreshingAuth(source, masker)
        bearer = self._bearers.get(name)
        if bearer is not None and bearer.profile is profile:
            auth = bearer.current(masker)
            if auth is not None:
                return auth
        if isinstance(profile, REFRESHABLE):
            return RefreshingAuth(self._token_source(profile), masker)
        if isinstance(profile, BearerProfile):
            return self._bearer_auth(profile, masker)
        if isinstance(profile, ConnectedUserProfile):
            token = self._user_token(profile, run)
            masker.add(token)
            value = f"{profile.scheme} {token}".strip()
            return ConnectedUserAuth(
                profile.name, profile.header, value, jwt.user_of(token), self._upkeep(name)
            )
        names = self._names(masker)
        if isinstance(profile, ApiKeyProfile):
            headers = {k: to_text(v) for k, v in render(profile.headers, names).items()}
            params = {k: to_text(v) for k, v in render(profile.query, names).items()}
            for value in [*headers.values(), *params.values()]:
                masker.add(value)
            return QueryAuth(params, headers)
        if isinstance(profile, BasicProfile):
            username = to_text(render(profile.username, names))
            password = to_text(render(profile.password, names))
            masker.add(password)
            encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
            masker.add(encoded)
            return HeaderAuth({"Authorization": f"Basic {encoded}"})
        raise StepFailed(f"auth profile '{name}' has an unknown kind")

    def _upkeep(self, name: str) -> Upkeep:
        """The status upkeep of a profile's responses (``_observe``), one per profile."""
        upkeep = self._upkeeps.get(name)
        if upkeep is None:
            upkeep = self._upkeeps[name] = Upkeep(functools.partial(self._observe, name))
        return upkeep

    # ------------------------------------------------------------ refreshable kinds

    def _token_source(self, profile: OAuth2Profile | SessionProfile) -> _TokenSource:
        source = self._sources.get(profile.name)
        if source is None or source.profile is not profile:
            source = _TokenSource(self, profile, self._upkeep(profile.name))
            self._sources[profile.name] = source
        return source

    def _grants(
        self, profile: OAuth2Profile | SessionProfile, masker: Masker
    ) -> OAuth2Grants | SessionGrants:
        def names() -> dict[str, Any]:
            return self._names(masker)

        if isinstance(profile, OAuth2Profile):
            return OAuth2Grants(profile, self.client, lambda v: render(v, names()), self.clock)
        return SessionGrants(profile, self.client, lambda v, extra: render(v, names() | extra))

    async def credential(
        self, name: str, masker: Masker, rejected: str | None = None
    ) -> Credential:
        """A valid token for an oauth2 or session profile, obtained or refreshed if needed."""
        profile = self.profile(name)
        if not isinstance(profile, REFRESHABLE):
            raise StepFailed(f"auth profile '{name}' is not refreshable")
        if rejected is None:
            cached = self._token_source(profile).current(masker)
            if cached is not None:
                return cached  # the path of nearly every request: no grants built
        grants = self._grants(profile, masker)
        try:
            credential = await self.tokens.credential(
                name, grants.grants, grants.parse, profile.refresh_margin, rejected=rejected
            )
        except ConfigurationError as exc:  # the stored tokens cannot be decrypted
            raise AuthError(profile.name, exc.message) from None
        for value in secret_values(credential):
            masker.add(value)
        return credential

    # ------------------------------------------------------------ bearer tokens

    def _bearer_auth(self, profile: BearerProfile, masker: Masker) -> BearerAuth:
        """The profile's auth for the token ``bearer_token`` chooses now, kept for the
        next requests (see ``_Bearer``)."""
        configured = self._configured_bearer(profile)
        stored = self._stored_bearer(profile.name)
        token, expires_at, candidates = self._choose_bearer(profile, configured, stored, masker)
        auth = BearerAuth(
            profile.name,
            profile.header,
            f"{profile.scheme} {token}".strip(),
            expires_at,
            functools.partial(self.mark_rejected, profile.name, token),
            self._upkeep(profile.name),
            self.clock,
            self.wall,
        )
        self._bearers[profile.name] = _Bearer(self, profile, configured, stored, candidates, auth)
        return auth

    def bearer_token(
        self, profile: BearerProfile, masker: Masker | None = None
    ) -> tuple[str, datetime | None]:
        """The token to use: the configured one or one stored with set-token, whichever
        expires later; refused before sending if it is the one already found revoked."""
        configured = self._configured_bearer(profile)
        stored = self._stored_bearer(profile.name)
        token, expiry, _ = self._choose_bearer(profile, configured, stored, masker)
        return token, expiry

    def _choose_bearer(
        self,
        profile: BearerProfile,
        configured: str | None,
        stored: Credential | None,
        masker: Masker | None,
    ) -> tuple[str, datetime | None, tuple[str, ...]]:
        """``bearer_token``'s choice, and every candidate (each registered with
        ``masker``, the one not chosen too)."""
        candidates: list[str] = []
        if configured:
            candidates.append(configured)
        revoked = set(stored.extra.get(REVOKED_KEY, [])) if stored is not None else set()
        if stored is not None and stored.status == ProfileStatus.REJECTED and stored.fingerprint:
            revoked.add(stored.fingerprint)
        if stored is not None and stored.access_token and stored.status != ProfileStatus.REJECTED:
            # First, so that it wins a tie: two tokens of unknown (or equal) expiry mean the
            # one set with set-token replaced the configured one.
            candidates.insert(0, stored.access_token)
        if masker is not None:
            for value in candidates:
                masker.add(value)
        # A token once refused with 401 is never sent again, whichever expires later.
        usable = [t for t in candidates if fingerprint(t) not in revoked] if revoked else candidates
        if not usable:
            if revoked:
                raise StepFailed(
                    f"auth profile '{profile.name}': this token was refused with 401 (revoked). "
                    "An administrator must log in as the machine user, generate a new token, "
                    f"and run 'flowrunner profiles set-token {profile.name}'"
                )
            raise StepFailed(
                f"auth profile '{profile.name}' has no token: set its secret, or "
                f"run 'flowrunner profiles set-token {profile.name}'"
            )
        expiries = [(bearer_expiry(profile, t), t) for t in usable]
        expiry, token = (
            max(expiries, key=lambda pair: pair[0] or NEVER) if usable[1:] else expiries[0]
        )
        return token, expiry, tuple(candidates)

    def _configured_bearer(self, profile: BearerProfile) -> str | None:
        """The profile's ``token:``, read afresh on every request (a new token put in the
        environment counts at once); the usual ``${{ secrets.NAME }}`` without a render."""
        secret = _single_secret(profile.token)
        if secret is not None:
            return _configured(self.secrets.get(secret))
        try:
            return to_text(render(profile.token, self._names(Masker()))).strip() or None
        except Exception as exc:
            log.debug("bearer profile %s: configured token unavailable: %s", profile.name, exc)
            return None

    def _stored_bearer(self, name: str) -> Credential | None:
        """The token stored with set-token, re-read at most every few seconds: a request
        must not cost a database read, and a token set from another process is still
        picked up promptly."""
        now = time.monotonic()
        cached = self._bearer_cache.get(name)
        if cached is not None and now - cached[0] < BEARER_REREAD_SECONDS:
            return cached[1]
        try:
            stored = self.store.load(name)
        except ConfigurationError as exc:  # the stored token cannot be decrypted
            raise AuthError(name, exc.message) from None
        self._bearer_cache[name] = (now, stored)
        return stored

    def mark_rejected(self, name: str, token: str) -> None:
        stored = self.store.load(name) or Credential(name)
        revoked = sorted(set(stored.extra.get(REVOKED_KEY, [])) | {fingerprint(token)})
        extra = {**stored.extra, REVOKED_KEY: revoked}
        self._bearer_cache.pop(name, None)
        self._bearers.pop(name, None)
        if (
            stored.access_token
            and stored.access_token != token
            and stored.status != ProfileStatus.REJECTED
        ):
            # Another token (stored with set-token) has not been refused: keep it for the
            # next run, and only remember that this one was revoked.
            self.store.save(replace(stored, extra=extra))
            return
        self.store.save(
            replace(
                stored,
                access_token=token,
                extra=extra,
                status=ProfileStatus.REJECTED,
                last_error="refused with 401 before its expiry: revoked",
            )
        )
        self._status[name] = ProfileStatus.REJECTED
        self._upkeep(name).quiet_until = 0.0

    def set_bearer_token(self, profile: BearerProfile, token: str) -> Credential:
        claims = jwt.claims(token)
        stored = self.store.load(profile.name)
        # Revoked tokens stay revoked (the secret may still hold one); a human who sets one
        # of them again is believed.
        revoked = set(stored.extra.get(REVOKED_KEY, [])) if stored is not None else set()
        if stored is not None and stored.status == ProfileStatus.REJECTED and stored.fingerprint:
            revoked.add(stored.fingerprint)
        revoked.discard(fingerprint(token))
        credential = Credential(
            profile=profile.name,
            access_token=token,
            access_expires_at=bearer_expiry(profile, token),
            extra={REVOKED_KEY: sorted(revoked)} if revoked else {},
            issued_at=jwt.claim_time(claims, "iat") or self.clock(),
            status=ProfileStatus.OK,
        )
        self.store.save(credential)
        self._status[profile.name] = ProfileStatus.OK
        self._upkeep(profile.name).quiet_until = 0.0
        self._bearer_cache.pop(profile.name, None)
        self._bearers.pop(profile.name, None)
        return credential

    # ------------------------------------------------------------ connected users

    def _user_token(self, profile: ConnectedUserProfile, run: RunContext) -> str:
        """The profile's `token:` expression over the trigger (by default the webhook's
        Authorization header), else the run's user token (`--user-token`)."""
        token = ""
        try:
            names = {"trigger": run.trigger, "secrets": self.secrets.view(run.masker)}
            token = to_text(render(profile.token, names)).strip()
        except ExpressionError:
            pass  # the trigger has no such field: fall back to the run's user token
        token = token or (run.user_token or "").strip()
        if not token:
            raise StepFailed(
                f"auth profile '{profile.name}' acts as the connected user, but this run has no "
                "user token (a webhook's Authorization header, or --user-token)"
            )
        return token.split(" ", 1)[1].strip() if " " in token else token

    # ------------------------------------------------------------ status from responses

    def _observe(self, name: str, response: WireResponse) -> None:
        """Keep the profile's status current: 403 is forbidden, a success clears it.
        Written only when it changes, and last use at most once a minute. The profile's
        Upkeep skips the call for a success while that would change nothing."""
        status = response.status_code
        if name not in self._status:
            stored = self.store.load(name)
            self._status[name] = stored.status if stored else ProfileStatus.OK
        new: str | None = None
        if status == 403:
            new = ProfileStatus.FORBIDDEN
        elif status < 400 and self._status.get(name, ProfileStatus.OK) != ProfileStatus.OK:
            new = ProfileStatus.OK
        if new is not None and self._status.get(name) != new:
            self._status[name] = new
            self.store.set_status(
                name, new, "last call refused with 403" if new == ProfileStatus.FORBIDDEN else None
            )
        now = time.monotonic()
        touched = self._touched.get(name, 0.0)
        if now - touched > TOUCH_EVERY_SECONDS:
            self._touched[name] = touched = now
            self.store.touch(name, self.clock())
        # Until the next touch is due, a success changes nothing while the status is ok
        # (the status changes only here, in mark_rejected and in set_bearer_token).
        quiet = self._status.get(name) == _OK
        self._upkeep(name).quiet_until = touched + TOUCH_EVERY_SECONDS if quiet else 0.0


def bearer_expiry(profile: BearerProfile, token: str) -> datetime | None:
    """From the JWT's ``exp`` (read without verifying), else the profile's ``expires_at``."""
    expiry = _jwt_expiry(token)
    if expiry is None and profile.expires_at is not None:
        expiry = (
            profile.expires_at
            if profile.expires_at.tzinfo
            else profile.expires_at.replace(tzinfo=UTC)
        )
    return expiry


@functools.lru_cache(maxsize=64)
def _jwt_expiry(token: str) -> datetime | None:
    """Decoded once per token, not once per request."""
    return jwt.claim_time(jwt.claims(token), "exp")


@functools.lru_cache(maxsize=256)
def _single_secret(template: str) -> str | None:
    """NAME when ``template`` is just ``${{ secrets.NAME }}``."""
    only = ONE_SECRET.fullmatch(template)
    return only.group(1) if only is not None else None


def secret_values(credential: Credential) -> tuple[str, ...]:
    """What a run's masker must know of a credential: its tokens and the text values the
    token endpoint sent with them."""
    values = (credential.access_token, credential.refresh_token, *credential.extra.values())
    return tuple(value for value in values if isinstance(value, str) and value)


class _TokenSource:
    """What the requests of one oauth2 or session profile share (a
    :class:`flowrunner.auth.flows.TokenSource`), built once per version of the profile.

    For the token in the TokenManager's cache it keeps the moment the token must be
    refreshed (``usable_until``: the refresh margin ahead of the expiry), the values a
    run's masker must know, and the header that carries it; each is worked out again when
    that token is replaced (a refresh, a rejection, a forgotten token). The clock is still
    read on every request."""

    __slots__ = (
        "_credential",
        "_headers",
        "_mask",
        "_until",
        "_until_ts",
        "name",
        "profile",
        "provider",
        "templates",
        "upkeep",
    )

    def __init__(
        self,
        provider: ProfileAuth,
        profile: OAuth2Profile | SessionProfile,
        upkeep: Upkeep,
    ) -> None:
        self.provider = provider
        self.profile = profile
        self.name = profile.name
        self.upkeep = upkeep
        templates = profile.headers or DEFAULT_HEADERS
        # The usual case, DEFAULT_HEADERS, has no template to render.
        self.templates = None if templates == DEFAULT_HEADERS else templates
        self._credential: Credential | None = None
        self._until = ALREADY
        self._until_ts = ALREADY.timestamp()
        self._mask: tuple[str, ...] = ()
        self._headers: tuple[tuple[str, str], ...] = ()

    def current(self, masker: Masker) -> Credential | None:
        provider = self.provider
        credential = provider.tokens.cached(self.name)
        if credential is None:
            return None
        if credential is not self._credential:
            self._until = usable_until(credential, self.profile.refresh_margin)
            self._until_ts = self._until.timestamp()
            self._mask = secret_values(credential)
            self._headers = (("Authorization", f"Bearer {credential.access_token}"),)
            self._credential = credential
        wall = provider.wall
        if wall is not None:
            if wall() >= self._until_ts:
                return None
        elif provider.tokens.clock() >= self._until:
            return None
        for value in self._mask:
            masker.add(value)
        return credential

    def get(self, masker: Masker, rejected: str | None) -> Awaitable[Credential]:
        return self.provider.credential(self.name, masker, rejected)

    def headers(self, credential: Credential, masker: Masker) -> Iterable[tuple[str, str]]:
        if self.templates is None:
            if credential is self._credential:
                return self._headers
            return (("Authorization", f"Bearer {credential.access_token}"),)
        token = {
            "access_token": credential.access_token,
            "refresh_token": credential.refresh_token,
            **{k: v for k, v in credential.extra.items() if k != SEED_KEY},
        }
        names = self.provider._names(masker) | {"token": token}
        return [(k, to_text(render(v, names))) for k, v in self.templates.items()]


def _configured(value: str | None) -> str | None:
    """A configured bearer token as read from a secret: None when unset or blank."""
    return value.strip() or None if value is not None else None


class _Bearer:
    """A bearer profile's auth for one configured and one stored token (and every
    candidate the run's masker must know), built once per version of the profile and
    pair of tokens."""

    __slots__ = (
        "auth",
        "candidates",
        "configured",
        "name",
        "profile",
        "provider",
        "secret",
        "stored",
    )

    def __init__(
        self,
        provider: ProfileAuth,
        profile: BearerProfile,
        configured: str | None,
        stored: Credential | None,
        candidates: tuple[str, ...],
        auth: BearerAuth,
    ) -> None:
        self.provider = provider
        self.profile = profile
        self.name = profile.name
        self.secret = _single_secret(profile.token)
        self.configured = configured
        self.stored = stored
        self.candidates = candidates
        self.auth = auth

    def current(self, masker: Masker) -> BearerAuth | None:
        """The auth while the configured token (read afresh, as on every request) and the
        stored one (the very object the provider read from the store less than
        ``BEARER_REREAD_SECONDS`` ago) are still these; else None: the provider chooses
        again."""
        provider = self.provider
        secret = self.secret
        if secret is not None:
            configured = _configured(provider.secrets.get(secret))
        else:
            configured = provider._configured_bearer(self.profile)
        read = provider._bearer_cache.get(self.name)
        if (
            configured != self.configured
            or read is None
            or read[1] is not self.stored
            or time.monotonic() - read[0] >= BEARER_REREAD_SECONDS
        ):
            return None
        for value in self.candidates:
            masker.add(value)
        return self.auth
