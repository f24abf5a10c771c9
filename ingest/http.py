"""HTTP for producers and readers: POST/GET /api/v1/events and /api/v1/streams/{stream}.

Translates requests into calls on the batcher, the store and the token verifier; holds no
logic of its own beyond status codes.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from auth.tokens import Principal
from common.problems import Problem, invalid_parameter, not_granted, unknown_stream
from config.settings import Settings
from ingest.events import IngestRequest
from ingest.ids import format_position, parse_position
from ingest.reads import read_history
from ingest.schema import invalid_stream, valid_stream
from ingest.validation import parse_body, parse_retention
from runtime.services import Services
from web.http import authenticate, json_response, read_body, services

bp = Blueprint("ingest", __name__)


@bp.post("/api/v1/events")
def post_events() -> Response:
    """The Flask route; `web.fast` serves the common case of this endpoint without Flask, both
    through `accept_events`."""
    svc = services()
    principal = authenticate()
    body = read_body(svc.settings.max_body_bytes, svc.settings.body_timeout_s)
    payload, status = accept_events(
        svc, principal, body, request.content_type or "", request.headers.get("Idempotency-Key")
    )
    return json_response(payload, status)


def accept_events(
    svc: Services, principal: Principal, body: bytes, content_type: str, idempotency_key: str | None
) -> tuple[dict[str, Any], int]:
    """Validate, authorize and commit one ingest request; the answer's body and status (201
    if anything new was stored, else 200), or a Problem."""
    settings = svc.settings
    events = parse_body(
        body,
        content_type,
        max_events=settings.max_batch_events,
        max_data_bytes=settings.max_data_bytes,
        header_key=idempotency_key,
    )
    for i, ev in enumerate(events):
        if not principal.publish.allows(ev.stream):
            raise not_granted("publish", ev.stream, i if len(events) > 1 else None)
    req = IngestRequest(principal.subject, events)
    svc.batcher.commit(req, timeout=settings.ingest_commit_timeout_s)
    results = req.results or []
    created = any(not w.duplicate for w in results)
    svc.metrics.events_in.inc(sum(1 for w in results if not w.duplicate))
    payload = {
        "events": [
            {
                "id": format_position(w.id),
                "stream": w.stream,
                "key": w.key,
                **({"duplicate": True} if w.duplicate else {}),
            }
            for w in results
        ]
    }
    return payload, 201 if created else 200


def _limit(settings: Settings) -> int:
    raw = request.args.get("limit", "100")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= settings.read_max_limit:
        raise invalid_parameter("limit", f"`limit` must be an integer from 1 to {settings.read_max_limit}")
    return int(raw)


def _after() -> int:
    raw = request.args.get("after")
    if raw is None or raw == "":
        return 0
    try:
        return parse_position(raw)
    except ValueError:
        raise invalid_parameter("after", "`after` must be an event id") from None


@bp.get("/api/v1/events")
def get_events() -> Response:
    svc = services()
    principal = authenticate()
    client_id = request.args.get("clientId")
    stream = request.args.get("stream")
    if client_id is None and stream is None:
        raise Problem(400, "invalid-parameter", "give `clientId`, `stream`, or both")
    if client_id is not None and not 1 <= len(client_id) <= 200:
        raise invalid_parameter("clientId", "`clientId` must be 1 to 200 characters")
    if stream is not None:
        _check_stream_name(stream)
        if not principal.subscribe.allows(stream):
            raise not_granted("subscribe", stream)
    limit, after = _limit(svc.settings), _after()
    page = read_history(
        svc.store,
        svc.pool,
        svc.batcher,
        principal.subscribe,
        client_id=client_id,
        stream=stream,
        after=after,
        limit=limit,
        mirror=svc.pending,
    )
    if stream is not None and not page.events and after == 0:
        with svc.pool.connection() as conn:
            if svc.store.describe_stream(conn, stream) is None:
                raise unknown_stream(stream)
    body: dict[str, Any] = {
        "events": [e.to_json() for e in page.events],
        "next": format_position(page.next),
        "pendingScope": page.pending_scope,
    }
    if page.reset is not None:
        body["reset"] = page.reset
    return json_response(body)


def _check_stream_name(stream: str) -> None:
    if not valid_stream(stream):
        raise invalid_stream()


def _stream_principal(stream: str, action: str) -> Principal:
    _check_stream_name(stream)
    principal = authenticate()
    grants = principal.publish if action == "publish" else principal.subscribe
    if not grants.allows(stream):
        raise not_granted(action, stream)
    return principal


@bp.put("/api/v1/streams/<path:stream>")
def put_stream(stream: str) -> Response:
    """Create the stream (idempotent); with `{"retention": {...}}`, set its overrides."""
    svc = services()
    _stream_principal(stream, "publish")
    retention = parse_retention(read_body(65536, svc.settings.body_timeout_s))
    with svc.pool.connection() as conn:
        created = svc.store.create_stream(conn, stream)
        if retention is not None:
            svc.store.set_retention(conn, stream, *retention)
        info = svc.store.describe_stream(conn, stream)
    if info is None:  # deleted between the two statements
        raise unknown_stream(stream)
    return json_response(_describe(info), 201 if created else 200)


@bp.get("/api/v1/streams/<path:stream>")
def get_stream(stream: str) -> Response:
    svc = services()
    _stream_principal(stream, "subscribe")
    with svc.pool.connection() as conn:
        info = svc.store.describe_stream(conn, stream)
    if info is None:
        raise unknown_stream(stream)
    return json_response(_describe(info))


@bp.delete("/api/v1/streams/<path:stream>")
def delete_stream(stream: str) -> Response:
    svc = services()
    _stream_principal(stream, "publish")
    with svc.pool.connection() as conn:
        existed = svc.store.delete_stream(conn, stream)
    if not existed:
        raise unknown_stream(stream)
    svc.hub.end_stream(stream)
    return Response(status=204)


def _describe(info: dict[str, Any]) -> dict[str, Any]:
    """A stream as the API shows it: its effective retention, its own overrides (null: the
    default), the oldest position it holds, and its subscribers in every process."""
    svc = services()
    own = info["retention"]
    effective = {
        "maxAgeS": svc.settings.retention_max_age_s if own["maxAgeS"] is None else own["maxAgeS"],
        "maxEvents": svc.settings.retention_max_events if own["maxEvents"] is None else own["maxEvents"],
    }
    return {
        **info,
        "retention": effective,
        "retentionOverride": own,
        "subscribers": svc.subscriber_count(info["name"]),
    }
