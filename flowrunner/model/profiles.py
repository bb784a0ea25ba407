"""The model of an auth profile (auth_profiles/*.yaml), one class per ``kind``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from flowrunner.model.base import Duration, Name, StrictModel
from flowrunner.model.flow import HttpMethod

DEFAULT_REMINDERS = (
    timedelta(days=30),
    timedelta(days=14),
    timedelta(days=7),
    timedelta(days=1),
)


class ProfileBase(StrictModel):
    name: Name
    description: str = ""
    allowed_hosts: list[str] = []
    base_url: str | None = None
    owner: str | None = None
    notify: list[str] = []
    remind_before: list[Duration] = list(DEFAULT_REMINDERS)

    @field_validator("allowed_hosts")
    @classmethod
    def _bare_hosts(cls, hosts: list[str]) -> list[str]:
        for index, host in enumerate(hosts):
            if "/" in host or " " in host or not host:
                bare = urlsplit(host).hostname if "//" in host else None
                raise PydanticCustomError(
                    "host",
                    "'{host}' is not a host name",
                    {
                        "host": host,
                        "at": index,
                        "hint": f"write the host alone: {bare}"
                        if bare
                        else "allowed_hosts: [api.example.com, *.example.com]",
                    },
                )
        return [h.lower() for h in hosts]

    def default_hosts(self) -> list[str]:
        """``allowed_hosts`` as written, else the host of the profile's own URLs."""
        if self.allowed_hosts:
            return self.allowed_hosts
        hosts = []
        for url in self.own_urls():
            if url and "${{" not in url:
                host = urlsplit(url).hostname
                if host and host not in hosts:
                    hosts.append(host)
        return hosts

    def own_urls(self) -> list[str | None]:
        return [self.base_url]


class BearerProfile(ProfileBase):
    """A token that cannot be refreshed, like an iObeya machine user's JWT."""

    kind: Literal["bearer"]
    token: str
    expires_at: datetime | None = None
    regenerate_every: Duration | None = None
    header: str = "Authorization"
    scheme: str = "Bearer"


class OAuth2Profile(ProfileBase):
    kind: Literal["oauth2"]
    grant: Literal["password", "client_credentials", "refresh_token"]
    token_url: str
    body_format: Literal["form", "json"] = "form"
    client_auth: Literal["body", "basic"] = "body"
    client_id: str | None = None
    client_secret: str | None = None
    username: str | None = None
    password: str | None = None
    refresh_token: str | None = None
    scope: str | None = None
    refresh_token_lifetime: Duration | None = None
    refresh_margin: Duration = timedelta(minutes=5)
    keep_alive: bool = False
    capture: dict[str, str] = {}
    headers: dict[str, str] = {}

    @model_validator(mode="after")
    def _grant_needs(self) -> OAuth2Profile:
        needed = {
            "password": ["username", "password"],
            "client_credentials": ["client_id", "client_secret"],
            "refresh_token": ["refresh_token"],
        }[self.grant]
        missing = [f for f in needed if getattr(self, f) is None]
        if missing:
            raise PydanticCustomError(
                "grant_fields",
                "grant {grant} needs {missing}",
                {
                    "grant": self.grant,
                    "missing": " and ".join(missing),
                    "hint": f"{missing[0]}: ${{{{ secrets.{missing[0].upper()} }}}}",
                },
            )
        return self

    def own_urls(self) -> list[str | None]:
        return [self.base_url, self.token_url]


class ConnectedUserProfile(ProfileBase):
    """Calls carry the credential of the user who triggered the run."""

    kind: Literal["connected_user"]
    token: str = "${{ trigger.headers.authorization }}"  # noqa: S105 - an expression, not a secret
    header: str = "Authorization"
    scheme: str = "Bearer"


class ApiKeyProfile(ProfileBase):
    kind: Literal["api_key"]
    headers: dict[str, str] = {}
    query: dict[str, str] = {}

    @model_validator(mode="after")
    def _somewhere(self) -> ApiKeyProfile:
        if not self.headers and not self.query:
            raise PydanticCustomError(
                "api_key_place",
                "an api_key profile sends its key in 'headers' or 'query'",
                {"hint": 'headers: {X-API-Key: "${{ secrets.SHOP_KEY }}"}'},
            )
        return self


class BasicProfile(ProfileBase):
    kind: Literal["basic"]
    username: str
    password: str


class LoginRequest(StrictModel):
    method: HttpMethod = "POST"
    url: str
    query: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    json_: Any = Field(default=None, alias="json")
    form: dict[str, Any] | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class SessionProfile(ProfileBase):
    """A login request whose answer is a token with a lifetime (Tripletex, webCRM)."""

    kind: Literal["session"]
    login: LoginRequest
    token: str  # JSONPath to the token in the login answer
    expires_in: str | None = None  # JSONPath to a lifetime in seconds
    expires_at: str | None = None  # JSONPath to an absolute expiry (date or date-time)
    lifetime: Duration | None = None  # used when the answer says nothing
    refresh_token: str | None = None  # JSONPath to a refresh token, when the API has one
    refresh: LoginRequest | None = None
    refresh_margin: Duration = timedelta(minutes=5)
    capture: dict[str, str] = {}
    headers: dict[str, str] = {"Authorization": "Bearer ${{ token.access_token }}"}

    def own_urls(self) -> list[str | None]:
        urls = [self.base_url, self.login.url]
        if self.refresh is not None:
            urls.append(self.refresh.url)
        return urls


Profile = Annotated[
    BearerProfile
    | OAuth2Profile
    | ConnectedUserProfile
    | ApiKeyProfile
    | BasicProfile
    | SessionProfile,
    Field(discriminator="kind"),
]

PROFILE_KINDS = ("bearer", "oauth2", "connected_user", "api_key", "basic", "session")
