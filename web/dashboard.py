"""The live dashboard: `/` (a page) and `/api/v1/stats` (its data, over Sluice's own SSE).

Every process writes a snapshot of its counters to Redis each second (streaming/presence.py);
`/api/v1/stats` sends, each second, `event: stats` with the sum over live processes. Counters
are cumulative (the page turns them into rates); gauges are current values. The stream explorer
on the page tails streams with static/sluice.js and the viewer's token, so it shows exactly what
that token grants.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import gevent
import orjson
from flask import Blueprint, Response, request, send_from_directory

from streaming.limits import token_key
from streaming.sse import EventStreamFraming
from streaming.tokens import unauthorized
from web.http import bearer_token, services

bp = Blueprint("dashboard", __name__)
STATIC = Path(__file__).resolve().parent.parent / "static"
INTERVAL_S = 1.0
framing = EventStreamFraming()
SUMMED = ("sse", "poll", "subscribers", "events_in", "deliveries", "flushes",
          "flush_seconds", "pool_in_use", "pool_size", "pool_waiting", "backlog")


def snapshot(svc: Any) -> dict[str, Any]:
    """This process's numbers (cumulative counters and current gauges)."""
    return {
        "sse": svc.limits.held.get("sse", 0), "poll": svc.limits.held.get("poll", 0),
        "subscribers": svc.hub.subscriber_count(),
        "events_in": svc.batcher.committed_events, "deliveries": svc.hub.delivered,
        "flushes": svc.batcher.flushes, "flush_seconds": svc.batcher.flush_seconds_total,
        "pool_in_use": svc.pool.in_use, "pool_size": svc.pool.size,
        "pool_waiting": svc.pool.waiting, "backlog": svc.batcher.backlog,
    }


def cluster_snapshot(svc: Any) -> dict[str, Any]:
    """The sum over every live process (this one's own numbers if Redis is unreachable)."""
    mine = snapshot(svc)
    others = svc.presence.snapshots()
    total = {k: mine[k] + sum(o.get(k, 0) for o in others) for k in SUMMED}
    total["processes"] = 1 + len(others)
    total["time"] = time.time()
    return total


@bp.get("/")
def page() -> Response:
    response = send_from_directory(STATIC, "dashboard.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/api/v1/stats")
def stats() -> Response:
    svc = services()
    token = bearer_token(allow_query=True, allow_cookie=True)
    if token is None:
        raise unauthorized("a token is required")
    svc.tokens.verify(token)  # any valid token may watch
    release = svc.limits.acquire(token_key(token), request.remote_addr, "stats")

    def stream() -> Iterator[bytes]:
        try:
            yield framing.preamble(svc.settings.retry_base_ms, "stats")
            while not svc.draining:
                yield framing.body("stats", orjson.dumps(cluster_snapshot(svc)).decode())
                gevent.sleep(INTERVAL_S)
            yield framing.retry_only(svc.settings.retry_base_ms)
        finally:
            release()

    response = Response(stream(), mimetype=framing.content_type,
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                        direct_passthrough=True)
    response.call_on_close(release)
    return response
