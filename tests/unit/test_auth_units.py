"""The auth layer's small parts on their own: reading token answers and JWTs, choosing
grants, the token cipher and its key file, the refresh lease, and scrubbing secrets from
token endpoint errors."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowrunner.auth import jwt
from flowrunner.auth.oauth2 import OAuth2Grants
from flowrunner.auth.provider import bearer_expiry
from flowrunner.auth.tokens import (
    CLOCK_SKEW,
    TokenManager,
    _holder_died,
    _scrub,
    lease_holder_id,
    parse_expires_in,
    parse_expiry,
)
from flowrunner.errors import ConfigurationError
from flowrunner.model import BearerProfile, OAuth2Profile
from flowrunner.store.crypto import KEY_ENV, TokenCipher
from flowrunner.store.database import Database
from flowrunner.store.tokens import Credential, TokenStore

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def segment(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def token_with(claims: Any) -> str:
    return f"{segment({'alg': 'none'})}.{segment(claims)}.c2ln"


# ---------------------------------------------------------------- token answers


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (7200, 7200),
        ("7200", 7200),
        ("7200.0", 7200),
        (7200.5, 7200.5),
        (None, None),
        (0, None),
        ("0", None),
        (-5, None),
        ("soon", None),
        (True, None),
        ([7200], None),
    ],
)
def test_parse_expires_in_accepts_what_apis_really_send(value: Any, seconds: float | None) -> None:
    """``expires_in`` as a number or numeric string is a lifetime; missing, zero, negative
    or junk means "unknown"."""
    expected = timedelta(seconds=seconds) if seconds is not None else None
    assert parse_expires_in(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1772366400, NOW),
        (1772366400.0, NOW),
        ("2026-03-01T12:00:00Z", NOW),
        ("2026-03-01T13:00:00+01:00", NOW),
        ("2026-03-01T12:00:00", NOW),
        ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
        ("next tuesday", None),
        (None, None),
        (False, None),
    ],
)
def test_parse_expiry_reads_epoch_and_iso_8601(value: Any, expected: datetime | None) -> None:
    """An absolute expiry is epoch seconds or ISO 8601 (a date, naive times taken as UTC)."""
    assert parse_expiry(value) == expected


# ---------------------------------------------------------------- JWTs


def test_jwt_claims_are_read_without_verification() -> None:
    """A JWT's claims are decoded whatever its signature; ``exp``/``iat`` become UTC times
    and the user comes from email, then the other usual claims, then ``sub``."""
    token = token_with({"sub": "u1", "email": "ann@acme.example", "exp": 1772366400, "iat": 1})
    values = jwt.claims(token)
    assert values is not None
    assert jwt.claim_time(values, "exp") == NOW
    assert jwt.claim_time(values, "nbf") is None
    assert jwt.user_of(token) == "ann@acme.example"
    assert jwt.user_of(token_with({"sub": "u1"})) == "u1"
    assert jwt.user_of(token_with({"preferred_username": "ann", "sub": "u1"})) == "ann"


@pytest.mark.parametrize(
    "token",
    ["opaque-token", "a.b", "a.!!!.c", f"x.{segment([1, 2])}.y", "a.b.c.d"],
)
def test_jwt_claims_of_a_non_jwt_are_none(token: str) -> None:
    """Opaque tokens and malformed JWTs have no claims (and no user), without raising."""
    assert jwt.claims(token) is None
    assert jwt.user_of(token) is None


def test_the_user_of_an_authorization_value() -> None:
    """``run.user`` comes from an Authorization value with its scheme, or a bare token; an
    opaque token, an empty value or a claim too long to be a name gives no user."""
    token = token_with({"sub": "u1", "email": "ann@acme.example"})
    assert jwt.user_of_credential(f"Bearer {token}") == "ann@acme.example"
    assert jwt.user_of_credential(f"  bearer   {token} ") == "ann@acme.example"
    assert jwt.user_of_credential(token) == "ann@acme.example"
    assert jwt.user_of_credential("Bearer opaque-token") is None
    assert jwt.user_of_credential("") is None
    assert jwt.user_of_credential(token_with({"sub": "x" * 201})) is None
    assert jwt.user_of_credential(token_with({"sub": "x" * 200})) == "x" * 200


@pytest.mark.parametrize(
    "email",
    ["", "x" * 201, "eve\x1b[2J@acme.example", "eve@acme.example\nfake line", " eve@acme"],
)
def test_a_claim_that_is_no_printable_name_is_passed_over(email: str) -> None:
    """An empty, over-long or unprintable claim (escape codes, line breaks: it would be
    printed by `runs list`) gives way to the next claim."""
    token = token_with({"email": email, "sub": "u-7"})
    assert jwt.user_of_credential(f"Bearer {token}") == "u-7"


def test_a_boolean_is_not_a_time_claim() -> None:
    """``"exp": true`` is not an expiry."""
    assert jwt.claim_time({"exp": True}, "exp") is None


def bearer(**fields: Any) -> BearerProfile:
    return BearerProfile(name="b", kind="bearer", token="${{ secrets.T }}", **fields)


def test_bearer_expiry_prefers_the_jwt_exp_over_expires_at() -> None:
    """A bearer token's expiry is its JWT ``exp``; else the profile's ``expires_at`` (a
    naive one taken as UTC); else unknown."""
    later = datetime(2030, 1, 1)
    assert bearer_expiry(bearer(expires_at=later), token_with({"exp": 1772366400})) == NOW
    assert bearer_expiry(bearer(expires_at=later), "opaque") == later.replace(tzinfo=UTC)
    assert bearer_expiry(bearer(), "opaque") is None


# ---------------------------------------------------------------- choosing grants


def oauth2(**fields: Any) -> OAuth2Profile:
    base = {
        "name": "o",
        "kind": "oauth2",
        "grant": "password",
        "token_url": "https://id.example/token",
        "client_id": "cid",
        "username": "u",
        "password": "pw",
    }
    return OAuth2Profile(**(base | fields))


def grants_for(profile: OAuth2Profile, stored: Credential | None, now: datetime = NOW) -> list[str]:
    grants = OAuth2Grants(profile, httpx.AsyncClient(), lambda v: v, lambda: now)
    return [g.name for g in grants.grants(stored)]


def test_grants_refresh_first_then_the_profiles_own_grant() -> None:
    """A live refresh token is tried first, then the password login; a spent or lapsed
    one (by the injected clock) is skipped."""
    stored = Credential("o", "at", refresh_token="rt", refresh_expires_at=NOW + timedelta(days=1))
    assert grants_for(oauth2(), stored) == ["refresh", "password login"]
    spent = Credential("o", "at", refresh_token="rt", refresh_token_spent=True)
    assert grants_for(oauth2(), spent) == ["password login"]
    assert grants_for(oauth2(), stored, NOW + timedelta(days=2)) == ["password login"]
    assert grants_for(oauth2(), None) == ["password login"]


def test_client_credentials_never_refresh() -> None:
    """A client-credentials profile asks for a new token rather than refreshing."""
    profile = oauth2(grant="client_credentials", client_secret="s", username=None, password=None)
    stored = Credential("o", "at", refresh_token="rt")
    assert grants_for(profile, stored) == ["client credentials"]


def test_the_configured_refresh_token_is_used_once() -> None:
    """A ``grant: refresh_token`` profile uses its configured refresh token until it has
    been sent once; after that only a stored one, or a new configured one, is tried."""
    profile = oauth2(grant="refresh_token", refresh_token="seed-1", username=None, password=None)
    assert grants_for(profile, None) == ["configured refresh token"]
    from flowrunner.auth.oauth2 import SEED_KEY
    from flowrunner.store.tokens import fingerprint

    used = Credential("o", "at", extra={SEED_KEY: fingerprint("seed-1")})
    assert grants_for(profile, used) == []
    renewed = oauth2(grant="refresh_token", refresh_token="seed-2", username=None, password=None)
    assert grants_for(renewed, used) == ["configured refresh token"]


def test_parse_keeps_the_old_refresh_token_and_captures_fields() -> None:
    """A token answer without a refresh token keeps the stored one (and its lapse); the
    lifetime is shortened by the clock-skew allowance; ``capture`` picks extra fields."""
    profile = oauth2(capture={"ticket": "$.so_ticket"})
    grants = OAuth2Grants(profile, httpx.AsyncClient(), lambda v: v, lambda: NOW)
    lapse = NOW + timedelta(days=3)
    stored = Credential("o", "old", refresh_token="rt-1", refresh_expires_at=lapse)
    fresh = grants.parse(
        {"access_token": "new", "expires_in": "3600", "so_ticket": "7T:x"}, stored, NOW
    )
    assert fresh.refresh_token == "rt-1" and fresh.refresh_expires_at == lapse
    assert fresh.access_expires_at == NOW + timedelta(hours=1) - CLOCK_SKEW
    assert fresh.extra == {"ticket": "7T:x"}


# ---------------------------------------------------------------- scrubbing errors


@pytest.mark.parametrize("encoding", ["json", "form", "query"])
def test_scrub_removes_the_secrets_a_token_request_carried(encoding: str) -> None:
    """Secret values the request carried (refresh token, password, client secret in Basic)
    are cut from the endpoint's error text; grant type and user name stay readable."""
    fields = {
        "grant_type": "password",
        "username": "robot",
        "password": "hunter2-pw",
        "refresh_token": "rt-0123456789",
    }
    headers = {"Authorization": "Basic " + base64.b64encode(b"cid:client-secret-9").decode()}
    url = "https://id.example/token"
    if encoding == "json":
        request = httpx.Request("POST", url, json=fields, headers=headers)
    elif encoding == "form":
        request = httpx.Request("POST", url, data=fields, headers=headers)
    else:
        request = httpx.Request("POST", url, params=fields, headers=headers)
    text = (
        "password grant for robot refused: token rt-0123456789, password hunter2-pw, "
        "client client-secret-9"
    )
    assert _scrub(text, request) == (
        "password grant for robot refused: token ***, password ***, client ***"
    )


# ---------------------------------------------------------------- the cipher and its key


def test_cipher_round_trip_and_wrong_key_fails_closed() -> None:
    """A passphrase gives the same key every time; another passphrase cannot decrypt and
    says which key to restore."""
    sealed = TokenCipher.from_passphrase("one").encrypt("secret-token")
    assert sealed is not None and "secret-token" not in sealed
    assert TokenCipher.from_passphrase("one").decrypt(sealed) == "secret-token"
    with pytest.raises(ConfigurationError, match=KEY_ENV):
        TokenCipher.from_passphrase("two").decrypt(sealed)
    assert TokenCipher.from_passphrase("one").encrypt(None) is None


def test_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    """Without the env variable a key file is created with mode 0600 and reused."""
    state = tmp_path / ".flowrunner"
    first = TokenCipher.for_project(state, environ={})
    key_file = state / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    sealed = first.encrypt("x")
    assert sealed is not None
    assert TokenCipher.for_project(state, environ={}).decrypt(sealed) == "x"
    assert TokenCipher.for_project(state, environ={KEY_ENV: "p"}).encrypt("x") != sealed


def test_processes_starting_at_once_agree_on_one_key(tmp_path: Path) -> None:
    """Many openers racing on a fresh project all end up with the same key, none fails,
    and no temporary file is left behind."""
    for round_ in range(10):
        state = tmp_path / f"p{round_}" / ".flowrunner"
        barrier = threading.Barrier(8)
        results: list[TokenCipher | BaseException] = []

        def open_cipher(
            state: Path = state,
            barrier: threading.Barrier = barrier,
            results: list[TokenCipher | BaseException] = results,
        ) -> None:
            barrier.wait()
            try:
                results.append(TokenCipher.for_project(state, environ={}))
            except BaseException as exc:  # collected, then asserted on
                results.append(exc)

        threads = [threading.Thread(target=open_cipher) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        ciphers = [r for r in results if isinstance(r, TokenCipher)]
        assert len(ciphers) == 8, results
        sealed = ciphers[0].encrypt("x")
        assert sealed is not None
        assert all(c.decrypt(sealed) == "x" for c in ciphers)
        assert [p.name for p in state.iterdir()] == ["secret.key"]


# ---------------------------------------------------------------- the lease


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TokenStore]:
    database = Database.open(f"sqlite:///{tmp_path / 'state.db'}")
    yield TokenStore(database, TokenCipher.from_passphrase("test"))
    database.close()


def test_the_lease_has_one_holder_until_released_or_run_out(store: TokenStore) -> None:
    """Only one holder at a time gets a profile's lease; it can renew it; another gets it
    once released or once it has run out."""
    minute = timedelta(minutes=1)
    assert store.try_lease("p", "a", NOW, minute)
    assert not store.try_lease("p", "b", NOW, minute)
    assert store.try_lease("p", "a", NOW, minute)
    assert store.lease_holder("p") == "a"
    assert store.try_lease("p", "b", NOW + 2 * minute, minute)
    store.release_lease("p", "a")  # not the holder any more: no effect
    assert store.lease_holder("p") == "b"
    store.release_lease("p", "b")
    assert store.lease_holder("p") is None


def test_a_dead_local_holder_is_recognised() -> None:
    """A lease holder id names its host and process: a process of this host that has
    exited is dead; this process, other hosts and odd ids are not."""
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(exited.stdout)
    mine = lease_holder_id()
    host = mine.split(":")[0]
    assert mine.split(":")[1] == str(os.getpid())
    assert _holder_died(f"{host}:{pid}:abc")
    assert not _holder_died(mine)
    assert not _holder_died(f"another-host:{pid}:abc")
    assert not _holder_died("0123456789abcdef")


async def test_usable_respects_the_margin_and_the_status(store: TokenStore) -> None:
    """A stored token is used while it is valid for longer than the margin and its
    profile is not waiting for a human."""
    manager = TokenManager(store, clock=lambda: NOW)
    margin = timedelta(minutes=5)
    assert manager.usable(Credential("p", "t", NOW + timedelta(minutes=6)), margin)
    assert not manager.usable(Credential("p", "t", NOW + timedelta(minutes=4)), margin)
    assert manager.usable(Credential("p", "t", None), margin)
    assert not manager.usable(Credential("p", None), margin)
    assert not manager.usable(Credential("p", "t", None, status="needs_login"), margin)


async def test_a_short_lived_token_is_used_for_half_its_life(store: TokenStore) -> None:
    """A token living shorter than the refresh margin is used for the first half of its
    life instead of being refreshed on every request."""
    manager = TokenManager(store, clock=lambda: NOW)
    margin = timedelta(minutes=5)
    short = Credential("p", "t", NOW + timedelta(seconds=90), issued_at=NOW)
    assert manager.usable(short, margin)
    later = TokenManager(store, clock=lambda: NOW + timedelta(seconds=50))
    assert not later.usable(short, margin)
    born_expired = Credential("p", "t", NOW - timedelta(seconds=1), issued_at=NOW)
    assert not manager.usable(born_expired, margin)
