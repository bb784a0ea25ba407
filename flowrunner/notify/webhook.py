"""Notifications as a JSON POST: plain JSON, or the payloads Slack and Teams expect."""

from __future__ import annotations

from typing import Any

import httpx

from flowrunner.model.settings import WebhookChannel


def payload(channel: WebhookChannel, subject: str, body: str, topic: str) -> dict[str, Any]:
    if channel.format == "slack":
        return {"text": f"*{subject}*\n{body}"}
    if channel.format == "teams":
        return {
            "type": "message",
            "attachments": [
                {
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "content": {
                        "type": "AdaptiveCard",
                        "version": "1.4",
                        "body": [
                            {
                                "type": "TextBlock",
                                "text": subject,
                                "weight": "Bolder",
                                "wrap": True,
                            },
                            {"type": "TextBlock", "text": body, "wrap": True},
                        ],
                    },
                }
            ],
        }
    return {"subject": subject, "body": body, "topic": topic}


async def send_webhook(
    channel: WebhookChannel,
    url: str,
    headers: dict[str, str],
    client: httpx.AsyncClient,
    subject: str,
    body: str,
    topic: str,
) -> None:
    response = await client.post(
        url, json=payload(channel, subject, body, topic), headers=headers, timeout=30
    )
    if response.status_code >= 300:
        raise RuntimeError(f"the webhook answered {response.status_code}: {response.text[:200]}")
