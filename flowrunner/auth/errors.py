"""Auth failures: each names the profile and says what a human must do."""

from __future__ import annotations

from flowrunner.runtime import StepFailed


class AuthError(StepFailed):
    """An auth profile could not provide a usable credential."""

    def __init__(self, profile: str, message: str) -> None:
        super().__init__(f"auth profile '{profile}': {message}")
        self.profile = profile


class TokenEndpointBusy(AuthError):
    """The token endpoint answered 429/5xx or could not be reached; stored tokens are kept."""


class NeedsLogin(AuthError):
    """No way is left to obtain a token without a human."""


class TokenRejected(AuthError):
    """The API refused a token that has not expired: it was revoked."""


class PermissionDenied(AuthError):
    """The API refused the call with 403: the user lacks a permission."""


def regenerate_instructions(profile: str) -> str:
    """What an administrator does when a machine user's token expired or was revoked."""
    return (
        "An administrator must log in as the machine user, generate a new token, and run "
        f"'flowrunner profiles set-token {profile}'"
    )
