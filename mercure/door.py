"""The Mercure front door's parts, built once per process when a Mercure key is set: the two
token verifiers, whether anonymous subscribers are admitted, and the selector fan-out."""

from __future__ import annotations

from dataclasses import dataclass

from auth.revocations import Revocations
from config.settings import Settings
from mercure.fanout import MercureFanout
from mercure.tokens import MercureKey, MercureTokens
from streaming.hub import Hub


@dataclass
class MercureDoor:
    publishers: MercureTokens
    subscribers: MercureTokens
    anonymous: bool
    fanout: MercureFanout


def build_door(settings: Settings, hub: Hub, revocations: Revocations | None = None) -> MercureDoor | None:
    """The door if a Mercure key is configured, else None (the endpoints answer 404)."""
    if settings.mercure_publisher_key is None or settings.mercure_subscriber_key is None:
        return None

    def tokens(key: tuple[str, str]) -> MercureTokens:
        return MercureTokens(MercureKey(*key), leeway_s=settings.token_leeway_s, revocations=revocations)

    return MercureDoor(
        tokens(settings.mercure_publisher_key),
        tokens(settings.mercure_subscriber_key),
        settings.mercure_anonymous,
        MercureFanout(hub),
    )
