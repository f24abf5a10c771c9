"""The process's services, built once from the settings and handed to the app factory.

`build_services` is the composition root below HTTP: it opens the pool, applies migrations,
and wires the batcher, the hub, auth, presence, webhooks and metrics together. Nothing here
knows about Flask; `web.app.create_app` turns a `Services` into an application.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis as redis_lib

from auth.authorize import OriginAuthorizer
from auth.backoff import Backoff
from auth.limits import ConnectionLimits
from auth.revocations import Revocations
from auth.tokens import TokenVerifier
from config.settings import Settings, SettingsError
from ingest.batcher import Batcher
from ingest.ledger import PgLedger
from ingest.pending import PendingMirror
from ingest.pool import Pool
from ingest.retention import Pruner
from ingest.store import EventStore
from mercure.door import MercureDoor, build_door
from runtime.metrics import AppMetrics
from runtime.stats import snapshot
from streaming.hub import Hub
from streaming.presence import Presence
from streaming.webhooks import WebhookNotifier

log = logging.getLogger("sluice")


@dataclass(kw_only=True)
class Services:
    """Everything a process shares between requests, built once and handed to the app."""

    settings: Settings
    pool: Pool
    store: EventStore
    batcher: Batcher
    tokens: TokenVerifier
    redis: Any
    metrics: AppMetrics
    hub: Hub
    backoff: Backoff
    limits: ConnectionLimits
    presence: Presence
    pruner: Pruner | None = None
    pending: PendingMirror | None = None
    revocations: Revocations | None = None
    authorizer: OriginAuthorizer | None = None
    notifier: WebhookNotifier | None = None
    mercure: MercureDoor | None = None
    draining: bool = False

    def subscriber_count(self, stream: str) -> int:
        return self.presence.count(stream)  # every process

    @property
    def registry(self) -> Any:
        return self.metrics.registry

    def close(self, timeout: float) -> bool:
        """Flush the batcher and release connections; True if everything flushed in time."""
        self.draining = True
        self.hub.stop(wait_s=min(1.0, timeout / 4))  # every stream ends with a `retry:` hint
        # and resumes elsewhere
        self.metrics.stop()
        self.presence.stop()
        if self.pruner is not None:
            self.pruner.stop()
        if self.notifier is not None:
            self.notifier.stop()
        flushed = self.batcher.stop(timeout)
        if self.pending is not None:
            self.pending.stop()  # after the flush: nothing of ours is pending any more
        self.limits.stop()
        if self.revocations is not None:
            self.revocations.stop()
        self.pool.close()
        try:
            self.redis.close()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        return flushed


def connect_redis(settings: Settings) -> Any:
    """A Redis client with short timeouts (Heroku Redis: TLS without a verifiable chain)."""
    url = settings.redis_url or ""
    tls: dict[str, Any] = (
        {"ssl_cert_reqs": None} if url.startswith("rediss://") and not settings.redis_verify_tls else {}
    )
    return redis_lib.Redis.from_url(
        url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=10, **tls
    )


def migrate(settings: Settings) -> list[str]:
    """Apply the schema migrations (the Procfile's release phase); returns those applied."""
    pool = Pool(settings.database_url or "", 1, 30, settings.db_connect_timeout_s)
    store = EventStore(settings.storage_slice_positions)
    try:
        with pool.connection() as conn:
            applied = store.migrate(conn)
            store.ensure_slices(conn, store.last_position(conn) + settings.storage_slice_positions)
            return applied
    finally:
        pool.close()


def build_services(settings: Settings) -> Services:
    """Connect to Postgres and Redis, apply migrations, and start the batcher and the hub."""
    if not settings.database_url or not settings.redis_url or not (settings.secrets or settings.public_keys):
        raise SettingsError("build_services needs DATABASE_URL, REDIS_URL and a key")
    pool = Pool(
        settings.database_url,
        settings.db_pool_size,
        settings.db_pool_timeout_s,
        settings.db_connect_timeout_s,
    )
    store = EventStore(settings.storage_slice_positions)
    with pool.connection(timeout_s=30) as conn:
        applied = store.migrate(conn)
        identity = store.identity(conn)
        store.ensure_slices(conn, store.last_position(conn) + settings.storage_slice_positions)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    metrics = AppMetrics()
    batcher = Batcher(
        store,
        pool,
        max_events=settings.batch_max_events,
        max_wait_ms=settings.batch_max_wait_ms,
        max_backlog=settings.ingest_max_backlog,
        metrics=metrics.batcher,
    ).start()
    redis = connect_redis(settings)
    revocations = Revocations(
        redis, namespace=f"sluice:{identity}", keep_s=settings.revocation_keep_s, ledger=PgLedger(pool)
    ).start()
    tokens = TokenVerifier(
        settings.secrets,
        public_keys=settings.public_keys,
        leeway_s=settings.token_leeway_s,
        redis=redis,
        revocations=revocations,
    )
    hub = Hub(
        store,
        pool,
        redis,
        channel=f"sluice:{identity}:commits",
        overflow_counter=metrics.slow_consumers,
        heartbeat_s=settings.heartbeat_s,
        write_timeout_s=settings.sse_write_timeout_s,
        stream_cache_s=settings.stream_cache_s,
    ).start()
    batcher.add_listener(hub.on_commit)
    revocations.listeners.append(hub.revoke)
    hub.admits = revocations.still_admits
    backoff = Backoff(
        redis, base_ms=settings.retry_base_ms, max_ms=settings.retry_max_ms, window_s=settings.retry_window_s
    )
    limits = ConnectionLimits(
        settings.max_connections_per_token,
        settings.max_connections_per_ip,
        refused=metrics.limited,
        redis=redis,
        namespace=f"sluice:{identity}",
    ).start()
    authorizer = None
    if settings.authorize_url:
        authorizer = OriginAuthorizer(
            settings.authorize_url,
            forward_headers=settings.authorize_forward_headers,
            timeout_s=settings.authorize_timeout_s,
            max_ttl_s=settings.authorize_max_ttl_s,
            redis=redis,
            metrics=metrics.authorize,
            revocations=revocations,
            namespace=f"sluice:{identity}",
        )
    notifier = None
    if settings.webhook_url and settings.webhook_secret:
        notifier = WebhookNotifier(
            settings.webhook_url,
            settings.webhook_secret,
            timeout_s=settings.webhook_timeout_s,
            metrics=metrics.webhook,
        ).start()
    presence = Presence(
        redis, hub, namespace=f"sluice:{identity}", notifier=notifier, grace_s=settings.webhook_grace_s
    ).start()
    pruner = Pruner(
        store,
        pool,
        max_age_s=settings.retention_max_age_s,
        max_events=settings.retention_max_events,
        every_s=settings.retention_prune_s,
        slice_width=settings.storage_slice_positions,
        metrics=metrics.pruned,
    ).start()
    pending = (
        PendingMirror(redis, batcher, namespace=f"sluice:{identity}", process_id=presence.process_id).start()
        if settings.pending_fleet
        else None
    )
    services = Services(
        settings=settings,
        pool=pool,
        store=store,
        batcher=batcher,
        tokens=tokens,
        redis=redis,
        metrics=metrics,
        hub=hub,
        backoff=backoff,
        limits=limits,
        presence=presence,
        pruner=pruner,
        pending=pending,
        revocations=revocations,
        authorizer=authorizer,
        notifier=notifier,
        mercure=build_door(settings, hub, revocations),
    )
    metrics.start(services)
    presence.stats = lambda: snapshot(services)
    return services
