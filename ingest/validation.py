"""Turn an ingest request body into validated events, or a 4xx problem naming what is wrong.

Nothing here touches the database: a request that fails validation stores nothing.
"""

from __future__ import annotations

from typing import Any

import orjson

from common.problems import Problem
from ingest.events import NewEvent
from ingest.schema import (
    DEFAULT_TYPE,
    EVENT_FIELDS,
    KEY_MAX,
    RETENTION_FIELDS,
    STREAM_PATTERN,
    TYPE_PATTERN,
    valid_key,
    valid_stream,
    valid_type,
)

JSON_TYPES = ("application/json", "")
MAX_DATA_DEPTH = 254  # orjson's encoder stops there (its parser allows 1024): beyond it, 400
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")


def bad_event(index: int | None, field: str | None, detail: str) -> Problem:
    return Problem(400, "invalid-event", detail, index=index, field=field)


def parse_body(
    body: bytes, content_type: str, *, max_events: int, max_data_bytes: int, header_key: str | None = None
) -> list[NewEvent]:
    """Parse one event, a JSON array, or NDJSON into NewEvents; raise a Problem on any fault."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in NDJSON_TYPES:
        items = _parse_ndjson(body, max_events)
        single = False
    elif mime in JSON_TYPES or mime.endswith("+json"):
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Problem(400, "invalid-json", f"body is not valid JSON: {exc}") from None
        single = isinstance(doc, dict)
        if single:
            items = [doc]
        elif isinstance(doc, list):
            items = doc
        else:
            raise Problem(400, "invalid-json", "body must be an event object or an array of events")
    else:
        raise Problem(
            415,
            "unsupported-media-type",
            "send application/json (an event or an array) or application/x-ndjson",
        )
    if not items:
        raise Problem(400, "empty-batch", "the request holds no events")
    if len(items) > max_events:
        raise Problem(
            413,
            "too-many-events",
            f"a request may hold at most {max_events} events, this one has {len(items)}",
            limit=max_events,
        )
    if header_key is not None and not single:
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Idempotency-Key applies to a single event; put `key` in each event of a batch",
        )
    events = [_event(item, i if not single else None, max_data_bytes) for i, item in enumerate(items)]
    if header_key is not None:
        if not valid_key(header_key):
            raise Problem(
                400, "invalid-idempotency-key", f"Idempotency-Key must be 1 to {KEY_MAX} characters"
            )
        if events[0].key is not None and events[0].key != header_key:
            raise Problem(
                400, "invalid-idempotency-key", "Idempotency-Key header and the event's `key` differ"
            )
        events[0].key = header_key
    return events


def _parse_ndjson(body: bytes, max_events: int) -> list[Any]:
    items: list[Any] = []
    for lineno, line in enumerate(body.split(b"\n")):
        if not line.strip():
            continue
        if len(items) >= max_events:
            raise Problem(
                413, "too-many-events", f"a request may hold at most {max_events} events", limit=max_events
            )
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise Problem(
                400, "invalid-json", f"line {lineno + 1} is not valid JSON: {exc}", index=len(items)
            ) from None
    return items


def _event(item: Any, index: int | None, max_data_bytes: int) -> NewEvent:
    if not isinstance(item, dict):
        raise bad_event(index, None, "each event must be a JSON object")
    unknown = item.keys() - EVENT_FIELDS
    if unknown:
        raise bad_event(index, sorted(unknown)[0], f"unknown field `{sorted(unknown)[0]}`")
    stream = item.get("stream")
    if stream is None:
        raise bad_event(index, "stream", "`stream` is required")
    if not valid_stream(stream):
        raise bad_event(index, "stream", f"`stream` must match {STREAM_PATTERN}")
    etype = item.get("type", DEFAULT_TYPE)
    if not valid_type(etype):
        raise bad_event(index, "type", f"`type` must match {TYPE_PATTERN}")
    if "data" not in item:
        raise bad_event(index, "data", "`data` is required (any JSON value, null included)")
    try:
        data = orjson.dumps(item["data"])
    except orjson.JSONEncodeError:  # the one way a parsed value fails to encode: its depth
        raise bad_event(
            index, "data", f"`data` may nest at most {MAX_DATA_DEPTH} arrays or objects deep"
        ) from None
    if len(data) > max_data_bytes:
        raise Problem(
            413,
            "data-too-large",
            f"`data` is {len(data)} bytes encoded; at most {max_data_bytes} are allowed",
            index=index,
            field="data",
            limit=max_data_bytes,
        )
    key = item.get("key")
    if key is not None and not valid_key(key):
        raise bad_event(index, "key", f"`key` must be a string of 1 to {KEY_MAX} characters without NUL")
    return NewEvent(stream, etype, data.decode(), key)


def parse_retention(body: bytes) -> tuple[int | None, int | None] | None:
    """The retention overrides in a stream's PUT body (None: the body sets none; an empty body
    is fine), or a 400 problem naming the field; nothing is changed on a problem."""
    if not body.strip():
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "invalid-json", f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Problem(400, "invalid-json", 'body must be {"retention": {...}}')
    unknown = sorted(doc.keys() - {"retention"})
    if unknown:
        raise Problem(400, "invalid-retention", f"unknown field `{unknown[0]}`", field=unknown[0])
    if "retention" not in doc:
        return None
    rules = doc["retention"]
    if not isinstance(rules, dict):
        raise Problem(400, "invalid-retention", "`retention` must be an object", field="retention")
    unknown = sorted(rules.keys() - set(RETENTION_FIELDS))
    if unknown:
        raise Problem(
            400,
            "invalid-retention",
            f"unknown field `retention.{unknown[0]}`",
            field=f"retention.{unknown[0]}",
        )
    values: list[int | None] = []
    for name in RETENTION_FIELDS:
        value = rules.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**62
        ):
            raise Problem(
                400,
                "invalid-retention",
                f"`retention.{name}` must be a whole number from 0 up, or null for the default",
                field=f"retention.{name}",
            )
        values.append(value)
    return values[0], values[1]
