"""Auth profiles applied to requests, one module per family of profile kinds."""

from __future__ import annotations

from flowrunner.auth.provider import ProfileAuth

__all__ = ["ProfileAuth"]
