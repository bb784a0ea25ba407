"""In-memory state of the sandbox: demo credentials, issued tokens, counters and fault switches."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from flowrunner.sandbox import jwt

# Well-known demo credentials. They only unlock this local fake, so they are public on purpose.
ERMEO_CLIENT_ID = "ermeo-demo-client"
ERMEO_CLIENT_SECRET = "ermeo-demo-secret"  # noqa: S105 - public demo value
ERMEO_USERNAME = "svc-flowrunner@acme.example"
ERMEO_PASSWORD = "demo-password"  # noqa: S105 - public demo value
IOBEYA_ADMIN_KEY = "iobeya-demo-admin"
IOBEYA_BOOTSTRAP_USER = "flowrunner-bot"
TRIPLETEX_CONSUMER_TOKEN = "tripletex-demo-consumer"  # noqa: S105 - public demo value
TRIPLETEX_EMPLOYEE_TOKEN = "tripletex-demo-employee"  # noqa: S105 - public demo value
SUPEROFFICE_CLIENT_ID = "superoffice-demo-client"
SUPEROFFICE_CLIENT_SECRET = "superoffice-demo-secret"  # noqa: S105 - public demo value
SUPEROFFICE_REFRESH_TOKEN = "superoffice-demo-refresh"  # noqa: S105 - public demo value
WEBCRM_APP_TOKEN = "webcrm-demo-apptoken"  # noqa: S105 - public demo value
WOOCOMMERCE_CONSUMER_KEY = "ck_demo"
WOOCOMMERCE_CONSUMER_SECRET = "cs_demo"  # noqa: S105 - public demo value
POWEROFFICE_API_KEY = "poweroffice-demo-key"

WORK_ORDERS_READ = "work_orders:read"
WORK_ORDERS_WRITE = "work_orders:write"

IOBEYA_BOOTSTRAP_VALIDITY = 365 * 86400
SYSTEMS_ISSUING_TOKENS = ("ermeo", "iobeya", "tripletex", "superoffice", "webcrm")


@dataclass(frozen=True)
class ConnectedUser:
    """An Ermeo user reached through a fixed internal-authentication token."""

    email: str
    roles: tuple[str, ...]


ERMEO_USER_TOKENS: Mapping[str, ConnectedUser] = MappingProxyType(
    {
        "ermeo-user-alice": ConnectedUser(
            "alice@acme.example", (WORK_ORDERS_READ, WORK_ORDERS_WRITE)
        ),
        "ermeo-user-bob": ConnectedUser("bob@acme.example", (WORK_ORDERS_READ,)),
    }
)


@dataclass(frozen=True)
class SandboxSettings:
    """Token lifetimes in seconds; shorten them in tests to exercise expiry."""

    access_token_ttl: int = 7200
    refresh_token_ttl: int = 14 * 86400
    session_ttl: int = 86400


@dataclass
class Grant:
    """An issued opaque token: who it speaks for and when it lapses."""

    subject: str
    expires_at: float
    used: bool = False  # only meaningful for single-use refresh tokens


@dataclass(frozen=True)
class TicketGrant:
    """A SuperOffice access token and the SO-Ticket that must accompany it."""

    ticket: str
    expires_at: float


@dataclass(frozen=True)
class MachineToken:
    """An iObeya machine-user JWT together with its identifying claims."""

    user: str
    token: str
    jti: str
    expires_at: int

    @property
    def expires_at_iso(self) -> str:
        return datetime.fromtimestamp(self.expires_at, UTC).isoformat()


@dataclass
class Fault:
    """A switch that makes the next `times` requests under `path_prefix` slow and/or fail."""

    path_prefix: str
    status: int | None = None
    retry_after: str | None = None
    delay_seconds: float = 0.0
    times: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ErmeoStore:
    access_tokens: dict[str, Grant] = field(default_factory=dict)
    refresh_tokens: dict[str, Grant] = field(default_factory=dict)
    work_orders: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class IobeyaStore:
    issued_jtis: set[str] = field(default_factory=set)
    revoked_jtis: set[str] = field(default_factory=set)
    cards: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TripletexStore:
    sessions: dict[str, float] = field(default_factory=dict)  # session token -> expires_at


@dataclass
class SuperOfficeStore:
    sessions: dict[str, TicketGrant] = field(default_factory=dict)  # access token -> ticket


@dataclass
class WebcrmStore:
    refresh_tokens: dict[str, Grant] = field(default_factory=dict)


class SandboxState:
    """Everything the fake systems remember, plus what the admin view reports.

    `clock` returns epoch seconds; tests inject a fake one to expire tokens without sleeping.
    """

    def __init__(
        self,
        settings: SandboxSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or SandboxSettings()
        self.clock = clock
        # Keys live as long as the process (reset keeps them) so handed-out tokens keep verifying.
        self.iobeya_signing_key = secrets.token_bytes(32)
        self.webcrm_signing_key = secrets.token_bytes(32)
        self._clear()
        self.iobeya_bootstrap = self.mint_iobeya_token(
            IOBEYA_BOOTSTRAP_USER, IOBEYA_BOOTSTRAP_VALIDITY
        )

    def reset(self) -> None:
        """Forget what clients did; keep the demo credentials, keys and bootstrap token."""
        self._clear()
        self.iobeya.issued_jtis.add(self.iobeya_bootstrap.jti)

    def _clear(self) -> None:
        self.requests: Counter[str] = Counter()
        self.tokens_issued: Counter[str] = Counter(dict.fromkeys(SYSTEMS_ISSUING_TOKENS, 0))
        self.refresh_token_reuses = 0
        self.faults: list[Fault] = []
        self.ermeo = ErmeoStore()
        self.iobeya = IobeyaStore()
        self.tripletex = TripletexStore()
        self.superoffice = SuperOfficeStore()
        self.webcrm = WebcrmStore()

    def record_request(self, route_key: str) -> None:
        self.requests[route_key] += 1

    def count_token(self, system: str) -> None:
        self.tokens_issued[system] += 1

    def count_refresh_token_reuse(self) -> None:
        self.refresh_token_reuses += 1

    def mint_iobeya_token(self, user: str, validity_seconds: int) -> MachineToken:
        """Sign a machine-user JWT and remember its jti so it can be revoked later."""
        issued_at = int(self.clock())
        expires_at = issued_at + validity_seconds
        jti = secrets.token_hex(16)
        claims = {"sub": user, "iat": issued_at, "exp": expires_at, "jti": jti}
        self.iobeya.issued_jtis.add(jti)
        return MachineToken(user, jwt.encode(claims, self.iobeya_signing_key), jti, expires_at)

    def arm_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    def take_fault(self, path: str) -> Fault | None:
        """Consume one use of the first armed fault covering `path`, if any."""
        for fault in self.faults:
            if path.startswith(fault.path_prefix):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "requests": dict(sorted(self.requests.items())),
            "tokens_issued": dict(self.tokens_issued),
            "refresh_token_reuses": self.refresh_token_reuses,
            "work_orders": list(self.ermeo.work_orders.values()),
            "cards": list(self.iobeya.cards),
            "faults": [fault.as_dict() for fault in self.faults],
        }
