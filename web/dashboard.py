"""The live dashboard: `/` (a page) and `/api/v1/stats` (its data, over Sluice's own SSE).

Every process writes a snapshot of its counters (runtime/stats.py) to Redis each second
(streaming/presence.py); `/api/v1/stats` sends, each second, `event: stats` with the sum over
live processes. Counters are cumulative (the page turns them into rates); gauges are current
values. The stream explorer on the page tails streams with static/sluice.js and the viewer's
token, so it shows exactly what that token grants.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gevent
import orjson
from flask import Blueprint, Response, request, send_from_directory

from auth.limits import token_key
from common.problems import unauthorized
from runtime.stats import OPERATOR_CLAIM, cluster_snapshot, scoped_snapshot
from streaming.sse import EventStreamFraming
from web.http import bearer_token, services

bp = Blueprint("dashboard", __name__)
STATIC = Path(__file__).resolve().parent.parent / "static"
INTERVAL_S = 1.0
framing = EventStreamFraming()


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
    principal = svc.tokens.verify(token)  # any valid token may watch what it may subscribe to
    operator = principal.claims.get(OPERATOR_CLAIM) is True
    release = svc.limits.acquire(token_key(token), request.remote_addr, "stats")

    def stream() -> Iterator[bytes]:
        try:
            yield framing.preamble(svc.settings.retry_base_ms, "stats")
            while not svc.draining:
                view = scoped_snapshot(cluster_snapshot(svc), operator, principal.subscribe.allows)
                yield framing.body("stats", orjson.dumps(view).decode())
                gevent.sleep(INTERVAL_S)
            yield framing.retry_only(svc.settings.retry_base_ms)
        finally:
            release()

    response = Response(
        stream(),
        mimetype=framing.content_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.call_on_close(release)  # also if the stream never started (not direct_passthrough)
    return response
