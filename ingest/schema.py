"""The rules an event's fields obey, in one place: the validator (`ingest.validation`), the
subscribe checks and the OpenAPI document (`web.openapi`) all take them from here, so what is
accepted and what is documented cannot drift apart."""

from __future__ import annotations

import re
from typing import Any

from common.problems import Problem

STREAM_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$"
TYPE_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
KEY_MAX = 200
DEFAULT_TYPE = "message"
EVENT_FIELDS = frozenset({"stream", "type", "data", "key"})

# Matched with `fullmatch`: Python's `$` also matches before a final newline, so `match` would
# take "name\n" (and a type ending in a newline would break its SSE `event:` line).
STREAM_RE = re.compile(STREAM_PATTERN)
TYPE_RE = re.compile(TYPE_PATTERN)


def valid_stream(name: Any) -> bool:
    """True for a string that is a legal stream name."""
    return isinstance(name, str) and STREAM_RE.fullmatch(name) is not None


def valid_type(name: Any) -> bool:
    return isinstance(name, str) and TYPE_RE.fullmatch(name) is not None


def valid_key(key: Any) -> bool:
    """An idempotency key: 1 to KEY_MAX characters, no NUL."""
    return isinstance(key, str) and 0 < len(key) <= KEY_MAX and "\x00" not in key


def invalid_stream(field: str = "stream") -> Problem:
    """400 for a stream name (query or path) that breaks the rule."""
    return Problem(400, "invalid-stream", f"stream names match {STREAM_PATTERN}", field=field)


def stream_schema() -> dict[str, Any]:
    """JSON Schema of a stream name."""
    return {"type": "string", "pattern": STREAM_PATTERN}


def stream_pattern_schema() -> dict[str, Any]:
    """JSON Schema of a subscription pattern (the token pattern syntax, with a `*`)."""
    return {"type": "string", "pattern": r"^(?=.*\*)[A-Za-z0-9._:/*-]{1,200}$"}


def new_event_schema(max_data_bytes: int = 65536) -> dict[str, Any]:
    """JSON Schema of one event in an ingest body, exactly as `ingest.validation` accepts it
    (a `key` of null is the same as no key)."""
    return {
        "type": "object",
        "required": ["stream", "data"],
        "additionalProperties": False,
        "properties": {
            "stream": stream_schema(),
            "type": {"type": "string", "pattern": TYPE_PATTERN, "default": DEFAULT_TYPE},
            "data": {"description": f"Any JSON value, at most {max_data_bytes // 1024} KiB encoded."},
            "key": {
                "anyOf": [
                    {"type": "string", "minLength": 1, "maxLength": KEY_MAX, "pattern": "^[^\\u0000]*$"},
                    {"type": "null"},
                ],
                "description": "Idempotency key, unique per client (null: none).",
            },
        },
    }


RETENTION_FIELDS = ("maxAgeS", "maxEvents")


def retention_schema() -> dict[str, Any]:
    """JSON Schema of `PUT /api/v1/streams/{stream}`'s optional body, as parse_retention takes it."""
    value = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "retention": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "maxAgeS": {
                        **value,
                        "description": "Seconds to keep events; 0 keeps forever; null: RETENTION_MAX_AGE_S.",
                    },
                    "maxEvents": {
                        **value,
                        "description": "Most events kept; 0 = no count limit; null: RETENTION_MAX_EVENTS.",
                    },
                },
            }
        },
    }
