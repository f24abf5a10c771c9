"""This process's numbers for the dashboard, and their sum over the fleet.

Every process writes `snapshot` to Redis each second beside its presence heartbeat
(streaming/presence.py); `cluster_snapshot` adds up the live ones, lists them (the processes
table), and lists the busiest streams: by recent events (every hub sees every commit of the
fleet, so this process's count is the fleet's) and by subscribers (summed over the processes'
snapshots), with each stream's effective retention from Postgres.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from typing import Any

import psycopg2

from ingest.pool import DatabaseUnavailable

SUMMED = (
    "sse",
    "poll",
    "subscribers",
    "events_in",
    "deliveries",
    "flushes",
    "flush_seconds",
    "pool_in_use",
    "pool_size",
    "pool_waiting",
    "backlog",
)
STREAM_ROWS = 25
HOST = socket.gethostname()
STARTED = time.time()


def snapshot(svc: Any) -> dict[str, Any]:
    """This process's numbers (cumulative counters and current gauges), who it is, and its
    subscriber counts of its busiest streams."""
    streams = svc.hub.busiest_streams(2 * STREAM_ROWS)
    if svc.mercure is not None:
        mercure = svc.mercure.fanout.count()
        if mercure:
            streams[".mercure"] = mercure
    return {
        "sse": svc.limits.held.get("sse", 0),
        "poll": svc.limits.held.get("poll", 0),
        "subscribers": svc.hub.subscriber_count(),
        "events_in": svc.batcher.committed_events,
        "deliveries": svc.hub.delivered,
        "flushes": svc.batcher.flushes,
        "flush_seconds": svc.batcher.flush_seconds_total,
        "pool_in_use": svc.pool.in_use,
        "pool_size": svc.pool.size,
        "pool_waiting": svc.pool.waiting,
        "backlog": svc.batcher.backlog,
        "host": HOST,
        "pid": os.getpid(),
        "started": STARTED,
        "at": time.time(),
        "streams": streams,
    }


def _retention(svc: Any, names: list[str]) -> dict[str, dict[str, int]]:
    """Each stream's effective retention (its override, else the default); {} if the database
    cannot answer now."""
    try:
        with svc.pool.connection() as conn:
            own = svc.store.retention_overrides(conn, names)
    except (DatabaseUnavailable, psycopg2.Error):
        return {}
    settings = svc.settings
    return {
        name: {
            "maxAgeS": settings.retention_max_age_s if age is None else age,
            "maxEvents": settings.retention_max_events if count is None else count,
        }
        for name, (age, count) in own.items()
    }


def cluster_snapshot(svc: Any) -> dict[str, Any]:
    """The sum over every live process (this one's own numbers if Redis is unreachable), the
    processes, and the busiest streams."""
    mine = snapshot(svc)
    processes = [mine, *svc.presence.snapshots()]
    total: dict[str, Any] = {k: sum(p.get(k, 0) for p in processes) for k in SUMMED}
    now = time.time()
    total["processes"] = len(processes)
    total["time"] = now
    total["process_list"] = sorted(
        (
            {
                "host": p.get("host", "?"),
                "pid": p.get("pid", 0),
                "connections": p.get("sse", 0) + p.get("poll", 0),
                "uptime_s": round(now - p.get("started", now), 1),
                "heartbeat_age_s": round(max(0.0, now - p.get("at", now)), 1),
            }
            for p in processes
        ),
        key=lambda p: (p["host"], p["pid"]),
    )
    subscribers: Counter[str] = Counter()
    for p in processes:
        subscribers.update(p.get("streams", {}))
    activity = svc.hub.activity
    names = list(
        dict.fromkeys(
            [name for name, *_ in activity.recent(STREAM_ROWS)]
            + [name for name, _ in subscribers.most_common(STREAM_ROWS)]
        )
    )
    names = names[:STREAM_ROWS]
    retention = _retention(svc, names) if names else {}
    rows = []
    for name in names:
        seen = activity.get(name)
        rows.append(
            {
                "name": name,
                "subscribers": subscribers.get(name, 0),
                "events": seen[0] if seen else 0,
                "lastId": str(seen[1]) if seen else None,
                "lastAt": seen[2] if seen else None,
                "retention": retention.get(name),
            }
        )
    total["streams"] = rows
    return total


OPERATOR_CLAIM = "operator"  # a token with `"operator": true` sees the whole fleet


def scoped_snapshot(full: dict[str, Any], operator: bool, may_see: Any) -> dict[str, Any]:
    """What one token may see of `cluster_snapshot`: everything for an operator; otherwise
    only the stream rows it may subscribe to (`may_see(name)`), and no hosts, pids or
    fleet-wide numbers."""
    if operator:
        return {**full, "scope": "fleet"}
    return {
        "scope": "streams",
        "time": full["time"],
        "streams": [row for row in full["streams"] if may_see(row["name"])],
    }
