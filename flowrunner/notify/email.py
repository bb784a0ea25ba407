"""Email over SMTP: STARTTLS, implicit TLS, or plain (for a local relay), with login."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage

from flowrunner.model.settings import EmailChannel


def _send(
    channel: EmailChannel,
    password: str | None,
    username: str | None,
    subject: str,
    body: str,
    recipients: list[str],
) -> None:
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = channel.sender
    message["To"] = ", ".join(recipients)
    message.set_content(body)
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if channel.security == "tls":
        smtp = smtplib.SMTP_SSL(channel.host, channel.port, timeout=30, context=context)
    else:
        smtp = smtplib.SMTP(channel.host, channel.port, timeout=30)
    with smtp:
        if channel.security == "starttls":
            smtp.starttls(context=context)
        if username:
            smtp.login(username, password or "")
        smtp.send_message(message)


async def send_email(
    channel: EmailChannel,
    username: str | None,
    password: str | None,
    subject: str,
    body: str,
    recipients: list[str],
) -> None:
    # smtplib blocks; a thread keeps the event loop (webhooks, schedules) responsive.
    await asyncio.to_thread(_send, channel, password, username, subject, body, recipients)
