"""Finds a step's auth profile and turns it into the auth flow that applies it."""

from __future__ import annotations

import base64
import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx

from flowrunner.auth import jwt
from flowrunner.auth.errors import AuthError
from flowrunner.auth.flows import BearerAuth, ConnectedUserAuth, RefreshingAuth
from flowrunner.auth.oauth2 import SEED_KEY, OAuth2Grants
from flowrunner.auth.session import SessionGrants
from flowrunner.auth.static import HeaderAuth, QueryAuth
from flowrunner.auth.tokens import TokenManager
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


class ProfileAuth:
    """The engine's AuthProvider for the profiles of one project."""

    def __init__(
        self,
        project: Project,
        secrets: SecretStore,
        store: TokenStore,
        client: httpx.AsyncClient,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.project = project
        self.secrets = secrets
        self.store = store
        self.client = client
        self.clock = clock or (lambda: datetime.now(UTC))
        self.tokens = TokenManager(store, self.clock)
        self._status: dict[str, str] = {}
        self._touched: dict[str, float] = {}
        self._bearer_cache: dict[str, tuple[float, Credential | None]] = {}

    def profile(self, name: str) -> ProfileBase:
        loaded = self.project.profiles.get(name)
        if loaded is None:
            raise StepFailed(f"auth profile '{name}' is not loaded (see flowrunner validate)")
        return loaded.profile

    def _names(self, masker: Masker) -> dict[str, Any]:
        return {"secrets": self.secrets.view(masker)}

    async def auth_for(self, name: str, run: RunContext) -> WireAuth:
        profile = self.profile(name)
        masker = run.masker

        async def observe(response: WireResponse) -> None:
            self._observe(name, response)

        if isinstance(profile, REFRESHABLE):
            return self._refreshing(profile, masker, observe)
        if isinstance(profile, BearerProfile):
            token, expires_at = self.bearer_token(profile, masker)

            async def rejected() -> None:
                self.mark_rejected(profile.name, token)

            value = f"{profile.scheme} {token}".strip()
            return BearerAuth(
                profile.name, profile.header, value, expires_at, rejected, observe, self.clock
            )
        if isinstance(profile, ConnectedUserProfile):
            token = self._user_token(profile, run)
            masker.add(token)
            value = f"{profile.scheme} {token}".strip()
            return ConnectedUserAuth(
                profile.name, profile.header, value, jwt.user_of(token), observe
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

    # ------------------------------------------------------------ refreshable kinds

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
        cached = self.tokens.cached(name) if rejected is None else None
        if cached is not None and self.tokens.usable(cached, profile.refresh_margin):
            credential = cached  # the path of nearly every request: no grants built
        else:
            grants = self._grants(profile, masker)
            try:
                credential = await self.tokens.credential(
                    name, grants.grants, grants.parse, profile.refresh_margin, rejected=rejected
                )
            except ConfigurationError as exc:  # the stored tokens cannot be decrypted
                raise AuthError(profile.name, exc.message) from None
        for value in (credential.access_token, credential.refresh_token):
            if value and value not in masker:
                masker.add(value)
        for value in credential.extra.values():
            if isinstance(value, str) and value not in masker:
                masker.add(value)
        return credential

    def _refreshing(
        self, profile: OAuth2Profile | SessionProfile, masker: Masker, observe: Any
    ) -> RefreshingAuth:
        async def get(rejected: str | None) -> Credential:
            return await self.credential(profile.name, masker, rejected)

        templates = profile.headers or DEFAULT_HEADERS
        plain = templates == DEFAULT_HEADERS  # the usual case: no template to render

        def headers(credential: Credential) -> dict[str, str]:
            if plain:
                return {"Authorization": f"Bearer {credential.access_token}"}
            token = {
                "access_token": credential.access_token,
                "refresh_token": credential.refresh_token,
                **{k: v for k, v in credential.extra.items() if k != SEED_KEY},
            }
            names = self._names(masker) | {"token": token}
            return {k: to_text(render(v, names)) for k, v in templates.items()}

        return RefreshingAuth(get, headers, observe)

    # ------------------------------------------------------------ bearer tokens

    def bearer_token(
        self, profile: BearerProfile, masker: Masker | None = None
    ) -> tuple[str, datetime | None]:
        """The token to use: the configured one or one stored with set-token, whichever
        expires later; refused before sending if it is the one already found revoked."""
        candidates: list[str] = []
        configured = self._configured_bearer(profile)
        if configured:
            candidates.append(configured)
        stored = self._stored_bearer(profile.name)
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
        return token, expiry

    def _configured_bearer(self, profile: BearerProfile) -> str | None:
        """The profile's ``token:``, read afresh on every request (a new token put in the
        environment counts at once); the usual ``${{ secrets.NAME }}`` without a render."""
        only = ONE_SECRET.fullmatch(profile.token)
        if only is not None:
            value = self.secrets.get(only.group(1))
            return value.strip() or None if value is not None else None
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
        self._bearer_cache.pop(profile.name, None)
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
        Written only when it changes, and last use at most once a minute."""
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
        if now - self._touched.get(name, 0.0) > TOUCH_EVERY_SECONDS:
            self._touched[name] = now
            self.store.touch(name, self.clock())


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
