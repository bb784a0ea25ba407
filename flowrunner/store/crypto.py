"""Encryption of tokens at rest (Fernet: AES-128-CBC with an HMAC-SHA256 tag).

The key comes from ``FLOWRUNNER_SECRET_KEY`` (any passphrase; it is stretched into a
Fernet key), else from a key file created once with mode 0600. A wrong key fails closed:
nothing is decrypted and the error says which key to restore.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from flowrunner.errors import ConfigurationError

log = logging.getLogger("flowrunner.store")
KEY_ENV = "FLOWRUNNER_SECRET_KEY"


class TokenCipher:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def from_passphrase(cls, passphrase: str) -> TokenCipher:
        digest = hashlib.sha256(passphrase.encode()).digest()
        return cls(base64.urlsafe_b64encode(digest))

    @classmethod
    def for_project(cls, state_dir: Path, environ: dict[str, str] | None = None) -> TokenCipher:
        env = os.environ if environ is None else environ
        passphrase = env.get(KEY_ENV)
        if passphrase:
            return cls.from_passphrase(passphrase)
        key_file = state_dir / "secret.key"
        if not key_file.exists() and _create_key_file(key_file):
            log.warning(
                "%s is not set: tokens are encrypted with a key kept in %s; back it up, or set "
                "%s on every node that shares this state",
                KEY_ENV,
                key_file,
                KEY_ENV,
            )
        return cls(key_file.read_bytes().strip())

    def encrypt(self, value: str | None) -> str | None:
        if value is None:
            return None
        return self._fernet.encrypt(value.encode()).decode("ascii")

    def decrypt(self, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return self._fernet.decrypt(value.encode("ascii")).decode()
        except InvalidToken:
            raise ConfigurationError(
                "stored tokens cannot be decrypted with this key: restore the "
                f"{KEY_ENV} (or .flowrunner/secret.key) they were stored with, or delete "
                "the stored tokens and log in again"
            ) from None


def _create_key_file(key_file: Path) -> bool:
    """Write a new key aside (mode 0600), then link it into place: processes starting at
    once on a fresh project agree on one key, and none reads a half-written file. False
    when another process created it first."""
    key_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = key_file.with_name(f".{key_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(Fernet.generate_key())
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, key_file)
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)
    return True
