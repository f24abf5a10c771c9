"""The OpenAPI 3.1 document served at /openapi.json: every endpoint, parameter, status, problem.

Kept next to the code it describes; a test checks that every route the app serves appears here.
"""

from __future__ import annotations

from typing import Any

from ingest.schema import new_event_schema, retention_schema, stream_pattern_schema, stream_schema
from mercure.http import PATH as MERCURE_PATH


def _problem(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}
        }
    return response


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


AUTH_ERRORS = {
    "401": _problem("Missing, malformed, expired, not-yet-valid or wrongly signed token."),
    "403": _problem("The token does not grant this stream."),
}
UNAVAILABLE = {
    "503": _problem("Database unreachable, pool exhausted, backlog full, or shutting down.", retry_after=True)
}
SUBSCRIBE_PARAMS: list[dict[str, Any]] = [
    {
        "name": "stream",
        "in": "query",
        "required": True,
        "style": "form",
        "explode": True,
        "schema": {
            "type": "array",
            "minItems": 1,
            "maxItems": 50,
            "items": {"anyOf": [stream_schema(), stream_pattern_schema()]},
        },
        "description": "A stream, or a pattern in the token syntax (`room/*`, `user/42/**`): "
        "every stream it matches, streams created later included. The grant must "
        "cover the pattern.",
    },
    {
        "name": "token",
        "in": "query",
        "schema": {"type": "string"},
        "description": "Token, for clients that cannot set headers (EventSource); or the "
        "`sluice_token` cookie. Without any token and with SLUICE_AUTHORIZE_URL "
        "set, the origin is asked (with the request's cookies).",
    },
]
SUBSCRIBE_REFUSALS = {
    "401": _problem(
        "Missing, malformed, expired, not-yet-valid or wrongly signed token, or the origin answered 401."
    ),
    "403": _problem("The token (or the origin's grant) does not cover a stream, or the origin answered 403."),
    "404": _problem("A stream does not exist."),
    "429": _problem(
        "Past MAX_CONNECTIONS_PER_TOKEN or MAX_CONNECTIONS_PER_IP (or, for "
        "long-poll, polling far faster than allowed).",
        retry_after=True,
    ),
}
STREAM_PARAM = {
    "name": "stream",
    "in": "path",
    "required": True,
    "description": "Stream name; may contain `/`.",
    "schema": stream_schema(),
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sluice",
            "version": "1",
            "description": "Real-time event gateway: durable ingest into PostgreSQL with group "
            "commit, history reads that include accepted-but-uncommitted events. "
            "Any endpoint may also answer 400 `too-many-parameters` (past "
            "MAX_QUERY_PARAMS) and 414 (a request line over MAX_REQUEST_LINE_BYTES); with "
            "CORS_ORIGINS set, preflight `OPTIONS` requests are answered 204 or "
            "403.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "mercureCookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "mercureAuthorization",
                    "description": "The Mercure door's token, as a cookie.",
                },
            },
            "schemas": SCHEMAS,
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/revocations": {
                "post": {
                    "summary": "Revoke a token (by `jti`) or every token of a subject issued up to "
                    'now (by `sub`); needs a token with `"revoke": true`.',
                    "description": "Every live connection the revoked token(s) admitted, in every "
                    "process, ends with a final `retry:` within a second; later "
                    "requests with them get 401. Revocations live in Redis "
                    "(REVOCATION_KEEP_S); without Redis: 503.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {
                                            "type": "object",
                                            "required": ["jti"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "jti": {"type": "string", "minLength": 1, "maxLength": 200}
                                            },
                                        },
                                        {
                                            "type": "object",
                                            "required": ["sub"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "sub": {"type": "string", "minLength": 1, "maxLength": 200}
                                            },
                                        },
                                    ]
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Revoked.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["revoked", "at"],
                                        "properties": {
                                            "revoked": {"type": "object"},
                                            "at": {"type": "string"},
                                        },
                                    }
                                }
                            },
                        },
                        "400": _problem('Not {"jti": ...} or {"sub": ...}.'),
                        "401": _problem("Missing or invalid token."),
                        "403": _problem("The token lacks the `revoke` claim."),
                        "408": _problem("The body did not arrive within BODY_TIMEOUT_S."),
                        "413": _problem("Body over 4 KiB."),
                        **UNAVAILABLE,
                    },
                }
            },
            "/api/v1/events": {
                "post": {
                    "summary": "Publish events (one, an array of up to 1,000, or NDJSON).",
                    "description": "Answered only once every event is committed. All or nothing. "
                    "A repeated `key` (per client) returns the original id.",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                            "description": "Key for a single-event body.",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/NewEvent"},
                                        {
                                            "type": "array",
                                            "minItems": 1,
                                            "maxItems": 1000,
                                            "items": {"$ref": "#/components/schemas/NewEvent"},
                                        },
                                    ]
                                }
                            },
                            "application/x-ndjson": {"schema": {"type": "string"}},
                        },
                    },
                    "responses": {
                        "201": _json("Written", "Committed; at least one event is new."),
                        "200": _json("Written", "Every event repeated an earlier key."),
                        "400": _problem("Bad JSON or field; `index` and `field` name it."),
                        "422": _problem(
                            "An idempotency key was used before for a different "
                            "event (stream, type or data); `key` names it. Nothing "
                            "of the request is stored."
                        ),
                        **AUTH_ERRORS,
                        "413": _problem("Body over 1 MiB, more than 1,000 events, or data over 64 KiB."),
                        "408": _problem("The body did not arrive within BODY_TIMEOUT_S."),
                        "415": _problem("Not JSON or NDJSON."),
                        **UNAVAILABLE,
                    },
                },
                "get": {
                    "summary": "Read history by client and/or stream, oldest first.",
                    "description": "Includes events accepted but not yet committed (`pending`), "
                    "never twice. Only streams the token may subscribe to.",
                    "parameters": [
                        {"name": "clientId", "in": "query", "schema": {"type": "string"}},
                        {"name": "stream", "in": "query", "schema": stream_schema()},
                        {
                            "name": "after",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "Resume after this id (`next` of the previous page).",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        },
                    ],
                    "responses": {
                        "200": _json("Page", "A page of events."),
                        "400": _problem("Neither filter given, or a bad parameter."),
                        **AUTH_ERRORS,
                        "404": _problem("The stream does not exist."),
                        **UNAVAILABLE,
                    },
                },
            },
            "/api/v1/streams/{stream}": {
                "parameters": [STREAM_PARAM],
                "put": {
                    "summary": "Create a stream (idempotent; needs `publish`); with a body, "
                    "set its retention overrides.",
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": retention_schema()}},
                    },
                    "responses": {
                        "201": _json("Stream", "Created."),
                        "200": _json("Stream", "Already existed (overrides set)."),
                        "400": _problem("Bad stream name or retention body."),
                        "404": _problem("Not a stream path (a name with control characters never routes)."),
                        **AUTH_ERRORS,
                        "408": _problem("Body too slow."),
                        "413": _problem("Body over 64 KiB."),
                        **UNAVAILABLE,
                    },
                },
                "get": {
                    "summary": "Describe a stream (needs `subscribe`).",
                    "responses": {
                        "200": _json("Stream", "The stream."),
                        "400": _problem("Bad stream name."),
                        **AUTH_ERRORS,
                        "404": _problem("No such stream."),
                        **UNAVAILABLE,
                    },
                },
                "delete": {
                    "summary": "Delete a stream and its history (needs `publish`).",
                    "responses": {
                        "204": {"description": "Deleted."},
                        "400": _problem("Bad stream name."),
                        **AUTH_ERRORS,
                        "404": _problem("No such stream."),
                        **UNAVAILABLE,
                    },
                },
            },
            "/api/v1/sse": {
                "get": {
                    "summary": "Subscribe with Server-Sent Events.",
                    "description": "All checks happen before the first byte. Then `retry:` and an "
                    "`id: <sid>.<position>` line, missed events since the resume id "
                    "(in pages), then live events and `:` heartbeats. A subscriber "
                    "that cannot keep up, or a server that is stopping, gets a final "
                    "`retry:` and the stream ends; Last-Event-ID resumes it.",
                    "parameters": SUBSCRIBE_PARAMS
                    + [
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                        {
                            "name": "lastEventId",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "Resume id for a first connection (`sid.position` or a position).",
                        },
                        {
                            "name": "sid",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "Connection id for clients that cannot keep one in ids.",
                        },
                        {
                            "name": "envelope",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["1"]},
                            "description": "`1`: every event arrives as `event: message` with data "
                            '`{"type": ..., "data": ...}`, so one EventSource '
                            "listener sees every type (static/sluice.js asks for it).",
                        },
                        {
                            "name": "hello",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["1"]},
                            "description": "`1`: after the preamble, send `event: hello` with "
                            '`{"sid": ...}`, so a client can tell that its stream '
                            "gets through (a buffering proxy holds it back). "
                            "static/sluice.js asks for it.",
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The event stream (or only `retry:` when the server "
                            "sheds load, or the database or the origin's "
                            "authorization is unreachable).",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "400": _problem("Malformed request."),
                        **SUBSCRIBE_REFUSALS,
                    },
                }
            },
            "/api/v1/poll": {
                "get": {
                    "summary": "Long-poll: events after `cursor`, or wait up to `timeout` seconds.",
                    "parameters": SUBSCRIBE_PARAMS
                    + [
                        {
                            "name": "cursor",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "Pass back the `cursor` of the previous answer; without it, "
                            "waits for events newer than now.",
                        },
                        {
                            "name": "timeout",
                            "in": "query",
                            "schema": {"type": "number", "minimum": 0, "maximum": 3600, "default": 25},
                            "description": "Seconds to hold (capped at LONGPOLL_MAX_S, at most 25).",
                        },
                        {
                            "name": "sid",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "Pass back the `sid` of the previous answer: the client is "
                            "paced by it (LONGPOLL_MAX_RATE).",
                        },
                    ],
                    "responses": {
                        "200": {
                            **_json("PollPage", "Events (possibly none), the cursor and the client's sid."),
                            "headers": {
                                "Retry-After": {
                                    "schema": {"type": "integer"},
                                    "description": "Present when the client polls faster "
                                    "than allowed: wait this many seconds "
                                    "before the next poll.",
                                }
                            },
                        },
                        "400": _problem("Malformed request."),
                        **SUBSCRIBE_REFUSALS,
                        "503": _problem(
                            "At the connection limit, database or origin "
                            "authorization unreachable, or shutting down.",
                            retry_after=True,
                        ),
                    },
                }
            },
            MERCURE_PATH: {
                "post": {
                    "summary": "Mercure: publish an update (the Mercure 0.x protocol).",
                    "description": "Answered once the update is committed. Publishing the same "
                    "`id` with the same update again answers that id and sends "
                    "nothing twice. The door is on when MERCURE_PUBLISHER_JWT_KEY "
                    "or MERCURE_SUBSCRIBER_JWT_KEY is set.",
                    "security": [{"bearer": []}, {"mercureCookie": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/x-www-form-urlencoded": {
                                "schema": {
                                    "type": "object",
                                    "required": ["topic"],
                                    "properties": {
                                        "topic": {
                                            "type": "array",
                                            "items": {"type": "string"},
                                            "description": "Repeatable: the first is canonical, "
                                            "the others alternate.",
                                        },
                                        "data": {"type": "string"},
                                        "private": {
                                            "type": "string",
                                            "description": "Present: only subscribers granted "
                                            "one of the topics get it.",
                                        },
                                        "id": {
                                            "type": "string",
                                            "description": "The update's id "
                                            "(default `urn:uuid:...`); no line break, not `#...`.",
                                        },
                                        "type": {
                                            "type": "string",
                                            "description": "The SSE `event:`; no line break.",
                                        },
                                        "retry": {
                                            "type": "string",
                                            "pattern": "^[0-9]+$",
                                            "description": "The SSE `retry:` in milliseconds.",
                                        },
                                    },
                                },
                                "encoding": {"topic": {"explode": True}},
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Committed: the update's id.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "400": _problem(
                            "No topic, a bad `id`, `type` or `retry`, a topic in the "
                            "hub's own namespace, data over MAX_DATA_BYTES, or a "
                            "body that is not a UTF-8 form."
                        ),
                        "401": _problem("No token, or one that does not verify."),
                        "403": _problem("The token's `mercure.publish` selectors do not match every topic."),
                        "404": _problem("The Mercure door is off."),
                        "413": _problem("Body over MAX_BODY_BYTES."),
                        "415": _problem("Not application/x-www-form-urlencoded."),
                        **UNAVAILABLE,
                    },
                },
                "get": {
                    "summary": "Mercure: subscribe with Server-Sent Events.",
                    "description": "Selectors are exact topics, RFC 6570 URI templates or `*`. "
                    "Each event's `id:` is the update's id. The token comes from "
                    "`Authorization`, else `authorization`, else the "
                    "mercureAuthorization cookie; with MERCURE_ANONYMOUS=1 "
                    "none is needed (public updates only).",
                    "security": [{"bearer": []}, {"mercureCookie": []}, {}],
                    "parameters": [
                        {
                            "name": "topic",
                            "in": "query",
                            "required": True,
                            "style": "form",
                            "explode": True,
                            "schema": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 50,
                                "items": {"type": "string", "minLength": 1},
                            },
                        },
                        {
                            "name": "authorization",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "The subscriber token, for clients that cannot set headers.",
                        },
                        {
                            "name": "lastEventID",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "Resume after this update id (`earliest`: all "
                            "retained history); the Last-Event-ID header wins.",
                        },
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "The event stream (or only `retry:` when the "
                            "server sheds load, is stopping, or the "
                            "database is unreachable). Resuming, it carries "
                            "`Last-Event-ID`: the id asked for, or "
                            "`earliest` when that id is unknown.",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "400": _problem("No topic, too many, or one too long."),
                        "401": _problem(
                            "No token (and anonymous subscribers are off), or one that does not verify."
                        ),
                        "404": _problem("The Mercure door is off."),
                        "429": _problem(
                            "Past MAX_CONNECTIONS_PER_TOKEN or MAX_CONNECTIONS_PER_IP.", retry_after=True
                        ),
                    },
                },
            },
            "/": {
                "get": {
                    "summary": "The live dashboard (HTML): charts over /api/v1/stats and "
                    "a stream explorer; asks for a token.",
                    "security": [],
                    "responses": {"200": {"description": "The page.", "content": {"text/html": {}}}},
                }
            },
            "/api/v1/stats": {
                "get": {
                    "summary": "Dashboard numbers over SSE: `event: stats` once a second with "
                    "connections, subscribers, cumulative events in and deliveries, "
                    "flushes and flush seconds, pool use and size, backlog, summed over "
                    "every live process.",
                    "parameters": [SUBSCRIBE_PARAMS[1]],
                    "responses": {
                        "200": {
                            "description": "The event stream.",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "401": AUTH_ERRORS["401"],
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness.",
                    "security": [],
                    "responses": {"200": {"description": "Alive."}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: Postgres and Redis reachable, not draining.",
                    "security": [],
                    "responses": {"200": {"description": "Ready."}, "503": {"description": "Not ready."}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics.",
                    "security": [],
                    "responses": {
                        "200": {"description": "Prometheus text format.", "content": {"text/plain": {}}}
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1."}},
                }
            },
        },
    }


SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "index": {"type": "integer", "description": "Offending event in a batch."},
            "field": {"type": "string"},
            "stream": {"type": "string"},
            "limit": {"type": "integer"},
        },
    },
    "NewEvent": new_event_schema(),
    "Written": {
        "type": "object",
        "required": ["events"],
        "properties": {
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "stream", "key"],
                    "properties": {
                        "id": {"type": "string"},
                        "stream": {"type": "string"},
                        "key": {"type": ["string", "null"]},
                        "duplicate": {"type": "boolean"},
                    },
                },
            }
        },
    },
    "Event": {
        "type": "object",
        "required": ["id", "stream", "type", "data", "clientId", "key", "createdAt"],
        "properties": {
            "id": {"type": ["string", "null"], "description": "null while pending."},
            "stream": {"type": "string"},
            "type": {"type": "string"},
            "data": {},
            "clientId": {"type": "string"},
            "key": {"type": ["string", "null"]},
            "createdAt": {"type": ["string", "null"], "format": "date-time"},
            "pending": {"type": "boolean", "description": "Accepted, not yet committed."},
        },
    },
    "Page": {
        "type": "object",
        "required": ["events", "next"],
        "properties": {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
            "next": {"type": "string", "description": "Pass as `after` to continue."},
            "reset": {"$ref": "#/components/schemas/Reset"},
        },
    },
    "PollPage": {
        "type": "object",
        "required": ["events", "cursor", "sid"],
        "properties": {
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "stream", "type", "data"],
                    "properties": {
                        "id": {"type": "string"},
                        "stream": {"type": "string"},
                        "type": {"type": "string"},
                        "data": {},
                    },
                },
            },
            "cursor": {"type": "string"},
            "reset": {"$ref": "#/components/schemas/Reset"},
            "sid": {"type": "string", "description": "Pass back as `sid` to be paced as one client."},
        },
    },
    "Reset": {
        "type": "object",
        "required": ["reason", "streams", "oldest"],
        "description": "History after the requested point is gone (pruned by retention, or the "
        "stream was deleted and re-created): what follows starts at `oldest`.",
        "properties": {
            "reason": {"type": "string", "enum": ["history-gone"]},
            "streams": {"type": "array", "items": {"type": "string"}},
            "oldest": {"type": ["string", "null"]},
        },
    },
    "Stream": {
        "type": "object",
        "required": [
            "name",
            "lastId",
            "createdAt",
            "subscribers",
            "retention",
            "retentionOverride",
            "oldest",
        ],
        "properties": {
            "name": {"type": "string"},
            "lastId": {"type": ["string", "null"]},
            "retention": {
                "type": "object",
                "description": "Effective rules.",
                "properties": {"maxAgeS": {"type": "integer"}, "maxEvents": {"type": "integer"}},
            },
            "retentionOverride": {
                "type": "object",
                "description": "The stream's own rules (null: the default).",
                "properties": {
                    "maxAgeS": {"type": ["integer", "null"]},
                    "maxEvents": {"type": ["integer", "null"]},
                },
            },
            "oldest": {"type": ["string", "null"], "description": "Oldest position still held."},
            "createdAt": {"type": "string", "format": "date-time"},
            "subscribers": {
                "type": "integer",
                "description": "Live SSE and "
                "long-poll subscribers in every process (refreshed "
                "every second).",
            },
        },
    },
}
