"""HTTP for the Mercure 0.x front door: `POST` and `GET /.well-known/mercure`.

Publishing takes the form the protocol defines (as the Symfony component encodes it: repeated
`topic=`), checks the publisher's `mercure.publish` selectors against every topic, and commits
the update through the batcher like any event; the answer (its id) comes after the commit.
Subscribing runs every check before the first byte (selectors, token, resume point, the
process's connection cap, the fleet limits and reconnect pacing) and then streams.
"""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qs

from flask import Blueprint, Response, request

from auth.limits import token_key
from common.headers import header_text, header_value
from common.problems import Problem, invalid_parameter, unauthorized
from ingest.events import IngestRequest
from ingest.pool import DatabaseUnavailable
from mercure.connection import MercureConnection
from mercure.door import MercureDoor
from mercure.fanout import MercureSubscription
from mercure.selectors import selector_problem
from mercure.tokens import ANONYMOUS, MercureClaims
from mercure.updates import MERCURE_CLIENT, TOPIC_MAX, parse_update
from runtime.services import Services
from streaming.connection import framing
from streaming.http import SSE_HEADERS, retry_only
from streaming.subscription import Mailbox
from web.http import parse_bearer, read_body, services
from web.writeorigin import check_write_origin

bp = Blueprint("mercure", __name__)
PATH = "/.well-known/mercure"
COOKIE = "mercureAuthorization"
FORM = "application/x-www-form-urlencoded"
EARLIEST = "earliest"


def _door(svc: Services) -> MercureDoor:
    if svc.mercure is None:
        raise Problem(
            404,
            "mercure-off",
            "the Mercure door is off: set MERCURE_PUBLISHER_JWT_KEY or MERCURE_SUBSCRIBER_JWT_KEY",
        )
    return svc.mercure


def _token(allow_query: bool) -> str | None:
    """Authorization header first, then (subscribers) `?authorization=`, then the cookie: the
    protocol's order, the first present wins and the others are ignored."""
    return _token_and_source(allow_query)[0]


def _token_and_source(allow_query: bool) -> tuple[str | None, str]:
    """The token, and where it came from: `header`, `query` or `cookie` (`` when none)."""
    header = request.headers.get("Authorization")
    if header:
        return parse_bearer(header), "header"
    if allow_query and request.args.get("authorization"):
        return request.args["authorization"], "query"
    cookie = request.cookies.get(COOKIE) or None
    return cookie, "cookie" if cookie else ""


@bp.post(PATH)
def publish() -> Response:
    svc = services()
    door = _door(svc)
    settings = svc.settings
    token, source = _token_and_source(allow_query=False)
    if token is None:
        raise unauthorized(
            "a publisher token is required (Authorization: Bearer, or the mercureAuthorization cookie)"
        )
    if source == "cookie":  # a browser sends the cookie whoever made the form: CSRF
        check_write_origin(
            request.headers, settings.mercure_publish_origins or settings.cors_origins, request.host
        )
    claims = door.publishers.verify(token)
    if not claims.publish:
        raise Problem(403, "not-granted", "the token's `mercure.publish` claim grants no topic")
    mimetype = (request.mimetype or "").lower()
    if mimetype != FORM:
        raise Problem(415, "unsupported-media-type", f"publish with Content-Type: {FORM}")
    body = read_body(settings.max_body_bytes, settings.body_timeout_s)
    try:
        form = parse_qs(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=settings.max_query_params,
        )
    except UnicodeDecodeError:
        raise Problem(400, "invalid-body", "the form must be UTF-8") from None
    except ValueError:
        raise Problem(
            400, "invalid-body", f"at most {settings.max_query_params} form fields per update"
        ) from None
    update = parse_update(form, settings.max_data_bytes)
    matcher = door.fanout.matcher
    for topic in update.topics:
        if not any(matcher.matches(s, topic) for s in claims.publish):
            raise Problem(403, "not-granted", f"the token may not publish to `{topic}`", topic=topic)
    # Ids are scoped by publisher: its own it may give a new update (a resume then starts
    # after the newest); another's is refused (409), so none can move another's resume point.
    publisher = "sub:" + claims.subject if claims.subject else token_key(token)
    req = IngestRequest(MERCURE_CLIENT, [update.to_event(publisher)], rekey=True, owner=publisher)
    svc.batcher.commit(req, timeout=settings.ingest_commit_timeout_s)
    if any(not w.duplicate for w in req.results or []):
        svc.metrics.events_in.inc()
    return Response(update.id, status=200, mimetype="text/plain")


def _resume(svc: Services) -> tuple[int | None, str | None]:
    """Where to start (a position; None: from now) and the `Last-Event-ID` to answer with."""
    header = request.headers.get("Last-Event-ID")
    wanted = header_text(header) if header else request.args.get("lastEventID")
    if not wanted:
        return None, None
    if wanted == EARLIEST:
        return 0, EARLIEST
    with svc.pool.connection() as conn:
        position = svc.store.key_position(conn, MERCURE_CLIENT, wanted)
    if position is None:  # unknown or no longer kept: from now, and say history is lost
        return None, EARLIEST
    return position, wanted


def _selectors(svc: Services) -> tuple[str, ...]:
    selectors = request.args.getlist("topic")
    if not selectors:
        raise invalid_parameter("topic", "give at least one `topic` selector")
    if len(selectors) > svc.settings.subscribe_max_streams:
        raise Problem(
            400,
            "too-many-topics",
            f"at most {svc.settings.subscribe_max_streams} topic selectors per subscription",
            field="topic",
            limit=svc.settings.subscribe_max_streams,
        )
    if not all(0 < len(s) <= TOPIC_MAX for s in selectors):
        raise invalid_parameter("topic", f"a topic selector is 1 to {TOPIC_MAX} characters")
    for selector in selectors:
        problem = selector_problem(selector)
        if problem is not None:
            raise invalid_parameter("topic", problem)
    return tuple(dict.fromkeys(selectors))


@bp.get(PATH)
def subscribe() -> Response:
    svc = services()
    door = _door(svc)
    settings = svc.settings
    if svc.draining:
        return retry_only(settings.retry_max_ms)
    if svc.hub.subscriber_count() >= settings.max_stream_connections:
        svc.metrics.shed.labels("sse").inc()
        return retry_only(svc.backoff.jittered_ms(4))
    selectors = _selectors(svc)
    token = _token(allow_query=True)
    claims: MercureClaims
    if token is not None:
        claims = door.subscribers.verify(token)
    elif door.anonymous:
        claims = ANONYMOUS
    else:
        raise unauthorized(
            "a subscriber token is required (Authorization: Bearer, "
            "?authorization= or the mercureAuthorization cookie)"
        )
    try:
        start, answer_id = _resume(svc)
    except DatabaseUnavailable:
        return retry_only(svc.backoff.retry_ms(4))
    # An update id cannot carry a connection id, so reconnects (requests that resume) are paced
    # by credential and address together: the `retry:` handed to them grows. Never a 429 here:
    # many browsers behind one address may share one subscriber token, and EventSource gives
    # up for good on an error status; MAX_CONNECTIONS_PER_TOKEN / _PER_IP bound what they hold.
    credential = token_key(token) if token is not None else f"anonymous:{request.remote_addr}"
    pace_key = "m" + hashlib.sha256(f"{credential}|{request.remote_addr}".encode()).hexdigest()[:24]
    if start is not None or answer_id is not None:
        _, retry = svc.backoff.connect(pace_key)
    else:
        retry = svc.backoff.jittered_ms(1)
    headers = dict(SSE_HEADERS)  # every header decided, and encodable, before anything registers
    if answer_id is not None:
        headers["Last-Event-ID"] = header_value(answer_id)
    if request.args.get("authorization"):
        headers["Cache-Control"] = "private, no-cache"
    release = svc.limits.acquire(credential, request.remote_addr, "sse")
    svc.metrics.retry_ms.observe(retry)
    leeway = door.subscribers.leeway_s
    sub = MercureSubscription(
        frozenset(),
        Mailbox(settings.subscriber_queue_max),
        expires_at=claims.expires_at + leeway if claims.expires_at else 0.0,
        jti=claims.jti,
        subject=claims.subject,
        issued_at=claims.issued_at,
        selectors=selectors,
        allowed=claims.subscribe,
    )
    try:
        connection = MercureConnection(
            svc, door.fanout, sub, start, retry, pace_key, request.environ, release
        )
    except BaseException:
        release()
        raise
    response = Response(connection.stream(), status=200, mimetype=framing.content_type, headers=headers)
    response.call_on_close(connection.response_closed)
    return response
