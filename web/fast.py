"""Precompiled dispatch for the hottest endpoint: `POST /api/v1/events` without Flask.

Flask's request and response objects, its context locals, URL matching and the before/after
hooks cost about a third of a single-event request's CPU. This WSGI layer sits in front of the
Flask app and serves the plain case itself: a POST to exactly `/api/v1/events` with no query
string and no `Origin` header (so no CORS and no query-parameter rules apply). It runs the same
code the Flask route does (`ingest.http.accept_events`, `web.http.read_input`), answers with the
same bodies, statuses and headers (problem+json with its headers, `Connection: close` while
draining), counts the response in the metrics under the route and writes the same request-log
line. Everything else goes to Flask unchanged.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import orjson

from common.problems import Problem, unauthorized
from ingest.http import accept_events
from runtime.services import Services
from web.http import PROBLEM_MIME, parse_bearer, read_input
from web.requestlog import write_line

log = logging.getLogger("sluice")
ROUTE = "/api/v1/events"
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
REASONS = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


class FastRoutes:
    def __init__(self, app: WSGIApp, services: Services) -> None:
        self.app = app
        self.svc = services
        self.log = services.settings.request_log
        self.pid = os.getpid()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != ROUTE or environ.get("REQUEST_METHOD") != "POST" \
                or environ.get("QUERY_STRING") or "HTTP_ORIGIN" in environ:
            return self.app(environ, start_response)
        started = time.monotonic()
        svc = self.svc
        headers: dict[str, str] = {}
        try:
            status, body = self._ingest(environ)
            mime = "application/json"
        except Problem as problem:
            status, body, mime = problem.status, orjson.dumps(problem.body()), PROBLEM_MIME
            headers = problem.headers
        except Exception:  # answered as Flask's error handler answers it
            log.exception("unhandled error")
            internal = Problem(500, "internal-error", "an unexpected error occurred")
            status, body, mime = 500, orjson.dumps(internal.body()), PROBLEM_MIME
        out = [("Content-Type", mime), ("Content-Length", str(len(body))), *headers.items()]
        if svc.draining:
            out.append(("Connection", "close"))
        svc.metrics.count_response(ROUTE, status)
        start_response(REASONS.get(status, str(status)), out)
        if self.log:
            write_line({"method": "POST", "path": ROUTE, "route": ROUTE, "status": status,
                        "ip": environ.get("REMOTE_ADDR"), "pid": self.pid}, started, environ)
        return [body]

    def _ingest(self, environ: dict[str, Any]) -> tuple[int, bytes]:
        svc = self.svc
        header = environ.get("HTTP_AUTHORIZATION")
        if not header:
            raise unauthorized("a token is required (Authorization: Bearer <token>)")
        principal = svc.tokens.verify(parse_bearer(header))
        body = read_input(environ, svc.settings.max_body_bytes, svc.settings.body_timeout_s)
        payload, status = accept_events(svc, principal, body, environ.get("CONTENT_TYPE", ""),
                                        environ.get("HTTP_IDEMPOTENCY_KEY"))
        return status, orjson.dumps(payload)
