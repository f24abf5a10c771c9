"""What the subscriber side needs from the process: the services `runtime.services.Services`
provides, named as a protocol so streaming depends on the shape and not on the composition root
(which sits above it and builds it)."""

from __future__ import annotations

from typing import Any, Protocol

from auth.authorize import OriginAuthorizer
from auth.backoff import Backoff
from auth.limits import ConnectionLimits
from auth.tokens import TokenVerifier
from config.settings import Settings
from ingest.pool import Pool
from ingest.store import EventStore
from streaming.hub import Hub
from streaming.presence import Presence


class StreamingServices(Protocol):
    """The process's services as subscriptions use them."""

    settings: Settings
    pool: Pool
    store: EventStore
    tokens: TokenVerifier
    hub: Hub
    backoff: Backoff
    limits: ConnectionLimits
    presence: Presence
    authorizer: OriginAuthorizer | None
    draining: bool
    metrics: Any  # runtime.metrics.AppMetrics
