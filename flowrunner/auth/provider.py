"""Finds a step's auth profile and turns it into the ``httpx.Auth`` that applies it."""

from __future__ import annotations

import base64

import httpx

from flowrunner.auth.static import HeaderAuth, QueryAuth
from flowrunner.expressions import render, to_text
from flowrunner.loader import Project
from flowrunner.model import (
    ApiKeyProfile,
    BasicProfile,
    BearerProfile,
    ConnectedUserProfile,
    ProfileBase,
)
from flowrunner.runtime import RunContext, StepFailed
from flowrunner.secrets import SecretStore


class ProfileAuth:
    """The engine's AuthProvider for the profiles of one project."""

    def __init__(self, project: Project, secrets: SecretStore) -> None:
        self.project = project
        self.secrets = secrets

    def profile(self, name: str) -> ProfileBase:
        loaded = self.project.profiles.get(name)
        if loaded is None:
            raise StepFailed(f"auth profile '{name}' is not loaded (see flowrunner validate)")
        return loaded.profile

    async def auth_for(self, name: str, run: RunContext) -> httpx.Auth:
        profile = self.profile(name)
        names = {"secrets": self.secrets.view(run.masker)}
        if isinstance(profile, BearerProfile):
            token = to_text(render(profile.token, names)).strip()
            run.masker.add(token)
            return HeaderAuth({profile.header: f"{profile.scheme} {token}".strip()})
        if isinstance(profile, ConnectedUserProfile):
            token = (run.user_token or "").strip()
            if not token:
                raise StepFailed(
                    f"auth profile '{name}' acts as the connected user, but this run has no "
                    "user token (a webhook's Authorization header, or --user-token)"
                )
            token = token.split(" ", 1)[1] if " " in token else token
            run.masker.add(token)
            return HeaderAuth({profile.header: f"{profile.scheme} {token}".strip()})
        if isinstance(profile, ApiKeyProfile):
            headers = {k: to_text(v) for k, v in render(profile.headers, names).items()}
            params = {k: to_text(v) for k, v in render(profile.query, names).items()}
            for value in [*headers.values(), *params.values()]:
                run.masker.add(value)
            return QueryAuth(params, headers)
        if isinstance(profile, BasicProfile):
            username = to_text(render(profile.username, names))
            password = to_text(render(profile.password, names))
            run.masker.add(password)
            encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
            run.masker.add(encoded)
            return HeaderAuth({"Authorization": f"Basic {encoded}"})
        raise StepFailed(
            f"auth profile '{name}' is of kind {getattr(profile, 'kind', '?')}, which this "
            "version of flowrunner cannot apply yet"
        )
