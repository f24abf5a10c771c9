"""The process's Prometheus instruments, created once by the app factory (never module-global)."""
from __future__ import annotations

import gc
from typing import Any

from greenlet import greenlet

from prometheus_client import CollectorRegistry, Counter, Gauge

from ingest.batcher import BatcherMetrics


class AppMetrics:
    """Counters and gauges for ingest, the pool and HTTP responses."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batcher = BatcherMetrics(self.registry)
        self.events_in = Counter("sluice_events_in", "Events committed by ingest",
                                 registry=self.registry)
        self.responses = Counter("sluice_http_responses", "HTTP responses by route and status",
                                 ["route", "status"], registry=self.registry)
        self.pool_in_use = Gauge("sluice_db_pool_in_use", "Database connections borrowed now",
                                 registry=self.registry)
        self.pool_waiting = Gauge("sluice_db_pool_waiters", "Callers waiting for a connection",
                                  registry=self.registry)
        self.pool_open = Gauge("sluice_db_pool_open", "Database connections open",
                               registry=self.registry)

        self.slow_consumers = Counter("sluice_slow_consumer_disconnects",
                                      "Subscribers cut loose because their queue filled",
                                      registry=self.registry)
        self.subscribers = Gauge("sluice_subscribers", "Subscriptions held by this process",
                                 registry=self.registry)
        self.greenlets = Gauge("sluice_greenlets", "Greenlets alive in this process (counted at "
                               "scrape time: a leak shows here)", registry=self.registry)
        self.shed = Counter("sluice_stream_connections_shed",
                            "Subscribe requests turned away at MAX_STREAM_CONNECTIONS",
                            ["transport"], registry=self.registry)
        self.authorize = Counter("sluice_authorize_requests",
                                 "Origin authorization checks by outcome (granted, denied, "
                                 "unavailable: asked the origin; cached: did not)",
                                 ["outcome"], registry=self.registry)
        self.limited = Counter("sluice_connection_limit_refusals",
                               "Subscribe requests refused by MAX_CONNECTIONS_PER_TOKEN / _IP",
                               ["limit"], registry=self.registry)
        self._children: dict[tuple[str, int], Any] = {}

    def count_response(self, route: str, status: int) -> None:
        """Count a response; `route` is the matched rule (bounded), never the raw path."""
        child = self._children.get((route, status))
        if child is None:
            child = self._children[(route, status)] = self.responses.labels(route, str(status))
        child.inc()

    def refresh(self, services: Any) -> None:
        """Copy point-in-time values into gauges just before a scrape."""
        self.pool_in_use.set(services.pool.in_use)
        self.pool_waiting.set(services.pool.waiting)
        self.pool_open.set(services.pool.opened)
        self.subscribers.set(services.hub.subscriber_count())
        self.greenlets.set(sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet)))
