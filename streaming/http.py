"""HTTP for subscribers: Server-Sent Events (`/api/v1/sse`) and long-poll (`/api/v1/poll`).

Both take the request apart into a `SubscribeRequest`, run the same checks before the first
byte (streaming/checks.py), and subscribe to the hub before catch-up so the seam between history
and live has no gap and no duplicate. Only what they answer differs: an `SSEConnection`'s
event stream (streaming/connection.py) or one JSON page (streaming/longpoll.py).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from auth.authorize import OriginUnavailable
from common.problems import Problem, invalid_parameter
from ingest.pool import DatabaseUnavailable
from runtime.services import Services
from streaming.checks import (
    SubscribeRequest,
    check_subscribe,
    new_sid,
    sid_of,
    unpaced_key,
)
from streaming.connection import SSEConnection, framing
from streaming.longpoll import long_poll
from streaming.subscription import bound_sid
from web.http import RequestView, bearer_token, json_response, services

bp = Blueprint("streaming", __name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _last_event_id(req: RequestView) -> str | None:
    return req.headers.get("Last-Event-ID") or req.args.get("lastEventId") or req.args.get("cursor")


def subscribe_request(req: RequestView) -> SubscribeRequest:
    token = bearer_token(allow_query=True, allow_cookie=True, req=req)
    return SubscribeRequest(
        streams=req.args.getlist("stream"),
        token=token,
        headers={k.lower(): v for k, v in req.headers.items()} if token is None else {},
        address=req.remote_addr,
        last_event_id=_last_event_id(req),
        sid=req.args.get("sid"),
    )


def retry_only(retry_ms: int) -> Response:
    """200 with only `retry:`: come back later (a 5xx would stop EventSource for good)."""
    return Response(
        framing.retry_only(retry_ms), status=200, mimetype=framing.content_type, headers=SSE_HEADERS
    )


def _shed_retry_ms(svc: Services) -> int:
    """At the connection limit: a growing retry for a known sid, a jittered one otherwise, so
    shed clients do not all come back at the same moment."""
    sid = sid_of(_last_event_id(request), request.args.get("sid"))
    if sid:
        return svc.backoff.connect(sid)[1]
    return svc.backoff.jittered_ms(4)


@bp.get("/api/v1/sse")
def sse() -> Response:
    svc = services()
    settings = svc.settings
    if svc.draining:
        return retry_only(settings.retry_max_ms)
    if svc.hub.subscriber_count() >= settings.max_stream_connections:
        svc.metrics.shed.labels("sse").inc()
        return retry_only(_shed_retry_ms(svc))
    try:
        checked = check_subscribe(svc, subscribe_request(request))
    except (DatabaseUnavailable, OriginUnavailable):
        return retry_only(svc.backoff.retry_ms(4))
    sid = checked.sid or new_sid()
    connects, retry = svc.backoff.connect(bound_sid(checked.subject, sid))
    if checked.sid and connects > settings.max_reconnects:
        svc.metrics.limited.labels("reconnects").inc()
        raise Problem(
            429,
            "reconnecting-too-fast",
            f"connection `{sid}` reconnected {connects} "
            f"times within {settings.retry_window_s} s, ignoring `retry:`",
            headers={"Retry-After": str(settings.retry_window_s)},
            limit=settings.max_reconnects,
        )
    release = svc.limits.acquire(checked.token_key, request.remote_addr, "sse")
    request.environ["sluice.sid"] = sid  # for the request log line
    svc.metrics.retry_ms.observe(retry)
    connection = SSEConnection(
        svc,
        checked,
        sid,
        retry,
        request.environ,
        release,
        hello=request.args.get("hello") == "1",
        envelope=request.args.get("envelope") == "1",
    )
    response = Response(connection.stream(), status=200, mimetype=framing.content_type, headers=SSE_HEADERS)
    # Not `direct_passthrough`: werkzeug then skips its closing wrapper, and these callbacks
    # (and the request log's) would never run.
    response.call_on_close(connection.response_closed)  # also when the stream never started
    return response


@bp.get("/api/v1/poll")
def poll() -> Response:
    """The Flask route; `web.fast` serves the common case without Flask, both through
    `answer_poll`."""
    payload, headers = answer_poll(services(), request)
    return json_response(payload, headers=headers)


def answer_poll(svc: Services, req: RequestView) -> tuple[dict[str, Any], dict[str, str]]:
    """One long-poll answer (its JSON body and extra headers), or a Problem."""
    settings = svc.settings
    if svc.draining:
        raise Problem(503, "shutting-down", "the server is restarting", headers={"Retry-After": "2"})
    raw_timeout = req.args.get("timeout", str(int(settings.longpoll_max_s)))
    try:
        hold = float(raw_timeout)
    except ValueError:
        raise invalid_parameter("timeout", "`timeout` must be seconds") from None
    if not 0 <= hold <= 3600:
        raise invalid_parameter("timeout", "`timeout` must be 0 to 3600 seconds")
    hold = min(hold, settings.longpoll_max_s)
    if svc.hub.subscriber_count() >= settings.max_stream_connections:
        svc.metrics.shed.labels("poll").inc()
        raise Problem(
            503,
            "overloaded",
            "this server holds as many connections as it may",
            headers={"Retry-After": str(max(1, svc.backoff.jittered_ms(4) // 1000))},
        )
    try:
        checked = check_subscribe(svc, subscribe_request(req))
    except OriginUnavailable:
        raise Problem(
            503,
            "origin-unavailable",
            "the origin did not authorize this subscription in time; try again",
            headers={"Retry-After": "2"},
        ) from None
    # Each answer hands out a sid; a client that passes it back is paced by it (within its
    # subject), one that does not by its subject and address together.
    pace = (
        bound_sid(checked.subject, checked.sid)
        if checked.sid
        else unpaced_key(checked.subject, req.remote_addr)
    )
    retry_after, refused = svc.backoff.poll(pace, settings.longpoll_max_rate)
    if refused:
        raise Problem(
            429,
            "polling-too-fast",
            "this client polls far faster than allowed; wait for Retry-After",
            headers={"Retry-After": str(retry_after)},
            limit_per_s=settings.longpoll_max_rate,
        )
    release = svc.limits.acquire(checked.token_key, req.remote_addr, "poll")
    try:
        answer = long_poll(svc, checked, hold)
    finally:
        release()
    headers = {"Retry-After": str(retry_after)} if retry_after else {}  # answered, but slow down
    return answer.to_json(), headers
