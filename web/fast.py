"""Precompiled dispatch for the two hottest endpoints, `POST /api/v1/events` and
`GET /api/v1/poll`, without Flask.

Flask's request and response objects, its context locals, URL matching and the before/after
hooks cost about a third of a single-event request's CPU. This WSGI layer sits in front of the
Flask app and serves the plain case itself: exactly that method and path, no `Origin` header
(so no CORS), and for ingest no query string. It runs the same code the Flask routes do
(`ingest.http.accept_events` and `web.http.read_input`; `streaming.http.answer_poll` with
werkzeug's request object and the same query-parameter cap), answers with the same bodies,
statuses and headers (problem+json with its headers, `Connection: close` while draining),
counts the response in the metrics under the route and writes the same request-log line.
Everything else goes to Flask unchanged.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import orjson
from werkzeug.wrappers import Request

from common.problems import Problem, internal_error, unauthorized
from ingest.http import accept_events
from runtime.services import Services
from streaming.http import answer_poll
from web.http import PROBLEM_MIME, check_query_params, parse_bearer, read_input
from web.requestlog import write_line

log = logging.getLogger("sluice")
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
REASONS = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
EVENTS = "/api/v1/events"
POLL = "/api/v1/poll"


class FastRoutes:
    def __init__(self, app: WSGIApp, services: Services) -> None:
        self.app = app
        self.svc = services
        self.log = services.settings.request_log
        self.pid = os.getpid()
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any]], tuple[int, bytes, dict[str, str]]]] = {
            ("POST", EVENTS): self._ingest, ("GET", POLL): self._poll}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        route = self.routes.get((environ.get("REQUEST_METHOD", ""), path))
        if route is None or "HTTP_ORIGIN" in environ or (
                path == EVENTS and environ.get("QUERY_STRING")):
            return self.app(environ, start_response)
        started = time.monotonic()
        svc = self.svc
        mime = "application/json"
        try:
            status, body, headers = route(environ)
        except Problem as problem:
            status, body, mime = problem.status, orjson.dumps(problem.body()), PROBLEM_MIME
            headers = problem.headers
        except Exception:  # answered as Flask's error handler answers it
            log.exception("unhandled error")
            internal = internal_error()
            status, body, mime, headers = 500, orjson.dumps(internal.body()), PROBLEM_MIME, {}
        out = [("Content-Type", mime), ("Content-Length", str(len(body))), *headers.items()]
        if svc.draining:
            out.append(("Connection", "close"))
        svc.metrics.count_response(path, status)
        start_response(REASONS.get(status, str(status)), out)
        if self.log:
            write_line({"method": environ["REQUEST_METHOD"], "path": path, "route": path,
                        "status": status, "ip": environ.get("REMOTE_ADDR"), "pid": self.pid},
                       started)
        return [body]

    def _ingest(self, environ: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        svc = self.svc
        header = environ.get("HTTP_AUTHORIZATION")
        if not header:
            raise unauthorized("a token is required (Authorization: Bearer <token>)")
        principal = svc.tokens.verify(parse_bearer(header))
        body = read_input(environ, svc.settings.max_body_bytes, svc.settings.body_timeout_s)
        payload, status = accept_events(svc, principal, body, environ.get("CONTENT_TYPE", ""),
                                        environ.get("HTTP_IDEMPOTENCY_KEY"))
        return status, orjson.dumps(payload), {}

    def _poll(self, environ: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        req = Request(environ)  # werkzeug's, without Flask's context and dispatch
        check_query_params(req, self.svc.settings.max_query_params)
        payload, headers = answer_poll(self.svc, req)
        return 200, orjson.dumps(payload), headers
