"""Sluice's Python SDK for origins and services: mint tokens, publish with safe retries, read
history, verify webhook signatures, and subscribe with automatic resume."""

from sluice_client.client import Client, HistoryPage, Published, SluiceError, StoredEvent, Subscription
from sluice_client.sse import Event, SSEParser
from sluice_client.tokens import mint_mercure_token, mint_token
from sluice_client.webhooks import signature, verify_webhook, webhook_secret

__all__ = [
    "Client",
    "Event",
    "HistoryPage",
    "Published",
    "SSEParser",
    "SluiceError",
    "StoredEvent",
    "Subscription",
    "mint_mercure_token",
    "mint_token",
    "signature",
    "verify_webhook",
    "webhook_secret",
]
__version__ = "0.1.0"
