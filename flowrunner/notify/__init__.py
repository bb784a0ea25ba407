"""Notifications: reminders and alerts, written to an outbox and delivered per channel
(email, webhook, log) with retries, so that none is dropped silently."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from flowrunner.expressions import render, to_text
from flowrunner.model.settings import EmailChannel, LogChannel, Settings, WebhookChannel
from flowrunner.notify.email import send_email
from flowrunner.notify.webhook import send_webhook
from flowrunner.secrets import Masker, SecretStore
from flowrunner.store.notifications import NotificationStore, OutboxItem

log = logging.getLogger("flowrunner.notify")


class Notifier:
    def __init__(
        self,
        settings: Settings,
        secrets: SecretStore,
        store: NotificationStore,
        client: httpx.AsyncClient,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.secrets = secrets
        self.store = store
        self.client = client
        self.clock = clock or (lambda: datetime.now(UTC))

    def channels_for(self, names: list[str]) -> list[str]:
        chosen = names or self.settings.default_notify
        return [n for n in chosen if n in self.settings.channels]

    def notify(
        self, topic: str, subject: str, body: str, channels: list[str], owner: str | None = None
    ) -> list[int]:
        """Queue one delivery per channel; returns the outbox ids."""
        recipients = [owner] if owner and "@" in owner else []
        now = self.clock()
        chosen = self.channels_for(channels)
        if not chosen:
            # No channel configured (default_notify: []): the log still says it.
            log.warning("no notification channel for %s: %s\n%s", topic, subject, body)
        return [self.store.enqueue(name, topic, subject, body, recipients, now) for name in chosen]

    async def deliver_due(self) -> tuple[int, int]:
        """Try every delivery that is due; returns (delivered, failed)."""
        delivered = failed = 0
        for item in self.store.due(self.clock()):
            masker = Masker()
            try:
                await self._deliver(item, masker)
            except Exception as exc:
                failed += 1
                error = masker.mask(f"{type(exc).__name__}: {exc}")
                self.store.failed(item, error, self.clock())
                log.warning(
                    "notification %s via %s failed (attempt %d): %s",
                    item.id,
                    item.channel,
                    item.attempts + 1,
                    error,
                )
            else:
                delivered += 1
                self.store.delivered(item.id, self.clock())
        return delivered, failed

    async def _deliver(self, item: OutboxItem, masker: Masker) -> None:
        channel = self.settings.channels.get(item.channel)
        if channel is None:
            raise RuntimeError(f"channel {item.channel} is no longer configured")
        names = {"secrets": self.secrets.view(masker)}
        if isinstance(channel, LogChannel):
            log.warning("%s\n%s", item.subject, item.body, extra={"topic": item.topic})
        elif isinstance(channel, EmailChannel):
            recipients = sorted(set(channel.to) | set(item.recipients))
            username = to_text(render(channel.username, names)) if channel.username else None
            password = to_text(render(channel.password, names)) if channel.password else None
            await send_email(channel, username, password, item.subject, item.body, recipients)
        elif isinstance(channel, WebhookChannel):
            url = to_text(render(channel.url, names))
            headers = {k: to_text(render(v, names)) for k, v in channel.headers.items()}
            await send_webhook(
                channel, url, headers, self.client, item.subject, item.body, item.topic
            )
