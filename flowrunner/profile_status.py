"""The truth about each credential, for `flowrunner profiles` and, later, the UI and reminders."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from flowrunner.auth import jwt
from flowrunner.auth.provider import ProfileAuth
from flowrunner.model import (
    BearerProfile,
    ConnectedUserProfile,
    OAuth2Profile,
    ProfileBase,
    SessionProfile,
)
from flowrunner.model.settings import Settings
from flowrunner.store.tokens import ProfileStatus
from flowrunner.store.tokens import fingerprint as token_fingerprint


@dataclass(frozen=True)
class ProfileState:
    name: str
    kind: str
    status: str
    expires_at: datetime | None = None
    refresh_lapses_at: datetime | None = None
    regenerate_by: datetime | None = None
    last_used_at: datetime | None = None
    last_error: str | None = None
    owner: str | None = None
    fingerprint: str | None = None

    @property
    def deadline(self) -> datetime | None:
        """The earliest moment a human must act by."""
        moments = [m for m in (self.expires_at, self.regenerate_by) if m is not None]
        if not moments and self.refresh_lapses_at is not None:
            moments = [self.refresh_lapses_at]
        return min(moments) if moments else None


def remind_before(profile: ProfileBase, settings: Settings) -> list[timedelta]:
    """The profile's own ``remind_before``, else the project's ``reminders.remind_before``."""
    if "remind_before" in profile.model_fields_set:
        return list(profile.remind_before)
    return list(settings.reminders.remind_before)


def profile_states(auth: ProfileAuth, now: datetime) -> list[ProfileState]:
    states = []
    for name, loaded in sorted(auth.project.profiles.items()):
        profile = loaded.profile
        stored = auth.store.load(name)
        status = stored.status if stored else ProfileStatus.OK
        expires_at = refresh_lapses = regenerate_by = None
        fingerprint = stored.fingerprint if stored else None
        if isinstance(profile, BearerProfile):
            try:
                token, expires_at = auth.bearer_token(profile)
            except Exception as exc:  # shown to the operator, not raised
                if status == ProfileStatus.OK:
                    status = ProfileStatus.NEEDS_LOGIN
                states.append(
                    ProfileState(
                        name, profile.kind, status, last_error=str(exc), owner=profile.owner
                    )
                )
                continue
            fingerprint = token_fingerprint(token)
            issued = jwt.claim_time(jwt.claims(token), "iat")
            if issued is None and stored is not None and stored.fingerprint == fingerprint:
                issued = stored.issued_at
            if profile.regenerate_every and issued:
                regenerate_by = issued + profile.regenerate_every
            replaced = stored is not None and stored.fingerprint != fingerprint
            if replaced and status == ProfileStatus.REJECTED:
                status = ProfileStatus.OK  # a new token replaced the revoked one
        elif isinstance(profile, OAuth2Profile | SessionProfile) and stored is not None:
            expires_at = stored.access_expires_at
            refresh_lapses = stored.refresh_expires_at
        if status == ProfileStatus.OK and not isinstance(profile, ConnectedUserProfile):
            # A refresh token's lapse needs a human only when nothing else can log in again.
            stranded = isinstance(profile, OAuth2Profile) and profile.grant == "refresh_token"
            status = _time_status(
                remind_before(profile, auth.project.settings),
                expires_at,
                regenerate_by,
                refresh_lapses if stranded else None,
                now,
                refreshable=isinstance(profile, OAuth2Profile | SessionProfile),
            )
        states.append(
            ProfileState(
                name,
                profile.kind,
                status,
                expires_at,
                refresh_lapses,
                regenerate_by,
                stored.last_used_at if stored else None,
                stored.last_error if stored else None,
                profile.owner,
                fingerprint,
            )
        )
    return states


def _time_status(
    remind_before: list[timedelta],
    expires_at: datetime | None,
    regenerate_by: datetime | None,
    refresh_lapses: datetime | None,
    now: datetime,
    refreshable: bool,
) -> str:
    # A refreshable access token expiring is routine; its refresh token lapsing is not.
    deadlines = [refresh_lapses] if refreshable else [expires_at, regenerate_by]
    moments = [m for m in deadlines if m is not None]
    if not moments:
        return ProfileStatus.OK
    first = min(moments)
    if first <= now:
        return ProfileStatus.EXPIRED
    window = max(remind_before) if remind_before else timedelta(days=30)
    return ProfileStatus.EXPIRING if first - now <= window else ProfileStatus.OK
