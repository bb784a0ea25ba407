"""A local fake of the business APIs the example flows call, for offline runs and tests."""

from __future__ import annotations

from flowrunner.sandbox.app import create_app, serve_sandbox
from flowrunner.sandbox.state import SandboxSettings

__all__ = ["SandboxSettings", "create_app", "serve_sandbox"]
