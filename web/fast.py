"""Precompiled dispatch for the two hottest endpoints, `POST /api/v1/events` and
`GET /api/v1/poll`, without Flask.

Flask's request and response objects, its context locals, URL matching and the before/after
hooks cost about a third of a single-event request's CPU. This WSGI layer sits in front of the
Flask app and serves the plain case itself: exactly that method and path, no `Origin` header
(so no CORS), and for ingest no query string. It runs the same code the Flask routes do
(`ingest.http.accept_events` and `web.http.read_input`; `streaming.http.answer_poll` with
`PlainRequest`, a view of the environ with the parts of werkzeug's request it reads, and the
same query-parameter cap), answers with the same bodies,
statuses and headers (problem+json with its headers, `Connection: close` while draining),
counts the response in the metrics under the route and writes the same request-log line.
Everything else goes to Flask unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_plus

import orjson
from werkzeug.datastructures import EnvironHeaders
from werkzeug.http import parse_cookie

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


class QueryArgs:
    """The query string as werkzeug's `args` answer it (`get`, `getlist`, `items(multi=True)`,
    `[name]`), parsed with one split per parameter: werkzeug's MultiDict and parser cost more
    than the rest of a long-poll answer's request handling."""

    __slots__ = ("_values",)

    def __init__(self, query: str) -> None:
        values: dict[str, list[str]] = {}
        for part in query.split("&"):
            if not part:
                continue
            if not part.isascii():  # the WSGI environ holds latin-1; the query is UTF-8
                part = part.encode("latin-1").decode("utf-8", "replace")
            name, _, value = part.partition("=")
            if "%" in part or "+" in part:
                name, value = unquote_plus(name), unquote_plus(value)
            values.setdefault(name, []).append(value)
        self._values = values

    def get(self, name: str, default: str | None = None) -> str | None:
        found = self._values.get(name)
        return found[0] if found else default

    def getlist(self, name: str) -> list[str]:
        return list(self._values.get(name, ()))

    def __getitem__(self, name: str) -> str:
        return self._values[name][0]

    def items(self, multi: bool = False) -> Iterator[tuple[str, str]]:
        for name, values in self._values.items():
            for value in values if multi else values[:1]:
                yield name, value


class PlainHeaders:
    """The request's headers as werkzeug's `EnvironHeaders` answers `get` (a plain environ
    look-up, without its general `__getitem__` path); `items` is werkzeug's own."""

    __slots__ = ("environ",)

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.upper().replace("-", "_")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            return self.environ.get(key, default)
        return self.environ.get("HTTP_" + key, default)

    def items(self) -> Iterable[tuple[str, str]]:
        return EnvironHeaders(self.environ).items()


class PlainRequest:
    """What `answer_poll` reads of a request (args, headers, cookies, the address and the raw
    query string), straight from the environ."""

    __slots__ = ("environ", "args", "headers", "_cookies")

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.args = QueryArgs(environ.get("QUERY_STRING", ""))
        self.headers = PlainHeaders(environ)
        self._cookies: dict[str, str] | None = None

    @property
    def query_string(self) -> bytes:
        return self.environ.get("QUERY_STRING", "").encode("latin-1")

    @property
    def remote_addr(self) -> str | None:
        return self.environ.get("REMOTE_ADDR")

    @property
    def cookies(self) -> dict[str, str]:
        if self._cookies is None:
            self._cookies = dict(parse_cookie(self.environ))
        return self._cookies


class FastRoutes:
    def __init__(self, app: WSGIApp, services: Services) -> None:
        self.app = app
        self.svc = services
        self.log = services.settings.request_log
        self.pid = os.getpid()
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any]], tuple[int, bytes, dict[str, str]]]] = {
            ("POST", EVENTS): self._ingest,
            ("GET", POLL): self._poll,
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        route = self.routes.get((environ.get("REQUEST_METHOD", ""), path))
        if route is None or "HTTP_ORIGIN" in environ or (path == EVENTS and environ.get("QUERY_STRING")):
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
            write_line(
                {
                    "method": environ["REQUEST_METHOD"],
                    "path": path,
                    "route": path,
                    "status": status,
                    "ip": environ.get("REMOTE_ADDR"),
                    "pid": self.pid,
                },
                started,
            )
        return [body]

    def _ingest(self, environ: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        svc = self.svc
        header = environ.get("HTTP_AUTHORIZATION")
        if not header:
            raise unauthorized("a token is required (Authorization: Bearer <token>)")
        principal = svc.tokens.verify(parse_bearer(header))
        body = read_input(environ, svc.settings.max_body_bytes, svc.settings.body_timeout_s)
        payload, status = accept_events(
            svc, principal, body, environ.get("CONTENT_TYPE", ""), environ.get("HTTP_IDEMPOTENCY_KEY")
        )
        return status, orjson.dumps(payload), {}

    def _poll(self, environ: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        req = PlainRequest(environ)  # without werkzeug's request, Flask's context and dispatch
        check_query_params(req, self.svc.settings.max_query_params)
        payload, headers = answer_poll(self.svc, req)
        return 200, orjson.dumps(payload), headers
