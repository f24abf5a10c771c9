"""The process's Prometheus instruments, created once by the app factory (never module-global).

Under gunicorn (several worker processes) `config/gunicorn.py` sets `PROMETHEUS_MULTIPROC_DIR`
before any worker imports prometheus_client, so every instrument writes to a per-process file
there, and `/metrics` (whichever worker answers) adds up all live workers. Point-in-time gauges
are then refreshed by each worker every second instead of at scrape time.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import gevent
from greenlet import greenlet
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ingest.batcher import BatcherMetrics
from runtime.looplag import LoopLag

RETRY_BUCKETS_MS = (500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 120000)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class AppMetrics:
    """Counters, gauges and histograms for ingest, streaming, the pool and HTTP responses."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        live: dict[str, Any] = {"multiprocess_mode": "livesum"}  # summed over live workers
        self.batcher = BatcherMetrics(reg)
        self.events_in = Counter("sluice_events_in", "Events committed by ingest", registry=reg)
        self.events_out = Counter(
            "sluice_events_out",
            "Event deliveries to subscribers (one event to one connection counts once)",
            registry=reg,
        )
        self.responses = Counter(
            "sluice_http_responses", "HTTP responses by route and status", ["route", "status"], registry=reg
        )
        self.pool_in_use = Gauge(
            "sluice_db_pool_in_use", "Database connections borrowed now", registry=reg, **live
        )
        self.pool_waiting = Gauge(
            "sluice_db_pool_waiters", "Callers waiting for a connection", registry=reg, **live
        )
        self.pool_open = Gauge("sluice_db_pool_open", "Database connections open", registry=reg, **live)
        self.slow_consumers = Counter(
            "sluice_slow_consumer_disconnects",
            "Subscribers cut loose because their queue filled",
            registry=reg,
        )
        self.subscribers = Gauge("sluice_subscribers", "Subscriptions held", registry=reg, **live)
        self.connections = Gauge(
            "sluice_connections",
            "Subscriber connections held, by transport",
            ["transport"],
            registry=reg,
            **live,
        )
        self.retry_ms = Histogram(
            "sluice_sse_retry_ms",
            "`retry:` values handed to SSE clients",
            registry=reg,
            buckets=RETRY_BUCKETS_MS,
        )
        self.greenlets = Gauge(
            "sluice_greenlets",
            "Greenlets alive (counted by a heap scan: a leak shows here)",
            registry=reg,
            **live,
        )
        self.shed = Counter(
            "sluice_stream_connections_shed",
            "Subscribe requests turned away at MAX_STREAM_CONNECTIONS",
            ["transport"],
            registry=reg,
        )
        self.authorize = Counter(
            "sluice_authorize_requests",
            "Origin authorization checks by outcome (granted, denied, "
            "unavailable: asked the origin; cached: did not)",
            ["outcome"],
            registry=reg,
        )
        self.limited = Counter(
            "sluice_connection_limit_refusals",
            "Subscribe requests refused by MAX_CONNECTIONS_PER_TOKEN / _IP or MAX_RECONNECTS",
            ["limit"],
            registry=reg,
        )
        self.webhook = Counter(
            "sluice_webhook_notices",
            "Subscription notices for the origin by outcome (sent, dropped)",
            ["outcome"],
            registry=reg,
        )
        self.pruned = Counter(
            "sluice_retention_removed",
            "Expired history removed by retention (events, and whole storage slices)",
            ["what"],
            registry=reg,
        )
        self.loop_lag = Gauge(
            "sluice_event_loop_lag_seconds",
            "The worst event-loop lag of the "
            "last 10 s: how late a 50 ms ticker woke (a request that holds "
            "the loop delays every connection by this much)",
            registry=reg,
            multiprocess_mode="max",
        )
        self.loop = LoopLag(self.loop_lag)
        self._children: dict[tuple[str, int], Any] = {}
        self._unsent: dict[tuple[str, int], int] = {}  # responses not yet in the counter
        self._batched = not multiprocess_dir()
        self._delivered_seen = 0
        self._refresher: gevent.Greenlet | None = None

    def count_response(self, route: str, status: int) -> None:
        """Count a response; `route` is the matched rule (bounded), never the raw path. In one
        process the counts wait in a dict until the next scrape (`refresh`): a labelled
        counter's `inc` takes a lock, a few µs of every small answer. Workers of a multiprocess
        group count at once, since any worker may answer the scrape."""
        key = (route, status)
        if self._batched:
            self._unsent[key] = self._unsent.get(key, 0) + 1
        else:
            self._counter(key).inc()

    def _counter(self, key: tuple[str, int]) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.responses.labels(key[0], str(key[1]))
        return child

    def _send_counts(self) -> None:
        unsent, self._unsent = self._unsent, {}
        for key, n in unsent.items():
            self._counter(key).inc(n)

    def refresh(self, services: Any, greenlets: bool = True) -> None:
        """Copy point-in-time values into gauges, and the responses counted meanwhile."""
        self._send_counts()
        self.pool_in_use.set(services.pool.in_use)
        self.pool_waiting.set(services.pool.waiting)
        self.pool_open.set(services.pool.opened)
        self.subscribers.set(services.hub.subscriber_count())
        for transport, held in services.limits.held.items():
            self.connections.labels(transport).set(held)
        delivered = services.hub.delivered
        if delivered > self._delivered_seen:
            self.events_out.inc(delivered - self._delivered_seen)
            self._delivered_seen = delivered
        if greenlets:
            self.greenlets.set(sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet)))

    def start(self, services: Any) -> None:
        """Measure the event loop's lag; in multiprocess mode, keep this worker's gauges fresh
        for whichever worker scrapes."""
        self.loop.start()
        if multiprocess_dir() and self._refresher is None:
            self._refresher = gevent.spawn(self._refresh_forever, services)

    def _refresh_forever(self, services: Any) -> None:
        tick = 0
        while True:
            gevent.sleep(1.0)
            try:
                self.refresh(services, greenlets=tick % 10 == 0)  # the heap scan is not free
            except Exception:  # noqa: BLE001 - never let metrics kill the worker
                pass
            tick += 1

    def stop(self) -> None:
        self.loop.stop()
        if self._refresher is not None:
            self._refresher.kill(block=False)

    def exposition(self, services: Any) -> bytes:
        """The text for /metrics: this process, or every live worker in multiprocess mode."""
        if multiprocess_dir():
            from prometheus_client import multiprocess

            self.refresh(services)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        self.refresh(services)
        return generate_latest(self.registry)
