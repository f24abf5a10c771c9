"""This process's numbers for the dashboard, and their sum over the fleet.

Every process writes `snapshot` to Redis each second beside its presence heartbeat
(streaming/presence.py); `cluster_snapshot` adds up the live ones.
"""
from __future__ import annotations

import time
from typing import Any

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
