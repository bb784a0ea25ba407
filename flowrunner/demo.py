"""``flowrunner serve --sandbox``: the example project against the built-in sandbox, in one
command, with the sandbox's demo credentials (``.env.example``) filling in missing secrets."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from flowrunner.app import build_runtime
from flowrunner.errors import ConfigurationError
from flowrunner.loader import load_project
from flowrunner.model import BearerProfile
from flowrunner.sandbox import create_app
from flowrunner.secrets import SecretStore

log = logging.getLogger("flowrunner.demo")
SANDBOX_PORT = 8900


def sandbox_secrets(root: Path) -> SecretStore:
    return SecretStore(root, fallbacks=[root / ".env.example"])


def start_sandbox(port: int = SANDBOX_PORT, wait_seconds: float = 10.0) -> uvicorn.Server:
    """The sandbox on 127.0.0.1 in a background thread, returned once it answers."""
    config = uvicorn.Config(
        create_app(), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sandbox", daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_seconds
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise ConfigurationError(
                f"the sandbox did not start on 127.0.0.1:{port} (is the port taken?)"
            )
        time.sleep(0.05)
    return server


def connect_to_sandbox(root: Path, secrets: SecretStore, port: int = SANDBOX_PORT) -> list[str]:
    """Store the sandbox's machine-user JWT in every bearer profile pointing at its iObeya
    (the sandbox signs with a fresh key each start, so yesterday's token is refused)."""
    base = f"http://127.0.0.1:{port}"
    answer = httpx.get(f"{base}/_admin/iobeya/bootstrap-token", timeout=10).json()
    project = load_project(root)
    runtime = build_runtime(root, project=project, keep_history=False, secrets=secrets)
    connected = []
    try:
        for name, loaded in project.profiles.items():
            profile = loaded.profile
            if isinstance(profile, BearerProfile) and (profile.base_url or "").startswith(
                f"{base}/iobeya"
            ):
                runtime.auth.set_bearer_token(profile, str(answer["token"]))
                connected.append(name)
    finally:
        asyncio.run(runtime.aclose())
    return connected
