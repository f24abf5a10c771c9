"""Small HTTP helpers shared by every blueprint: JSON and problem responses, auth extraction."""

from __future__ import annotations

from typing import Any, Protocol

import gevent
import orjson
from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from auth.tokens import Principal
from common.problems import Problem, internal_error, unauthorized
from runtime.services import Services

PROBLEM_MIME = "application/problem+json"


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status=status, headers=headers, mimetype="application/json")


def problem_response(problem: Problem) -> Response:
    return Response(
        orjson.dumps(problem.body()), status=problem.status, headers=problem.headers, mimetype=PROBLEM_MIME
    )


def read_body(limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refusing with 413 past `limit` bytes (chunked bodies included) and
    with 408 when it has not all arrived within `timeout_s` (a slow upload holds nothing
    longer than that)."""
    return read_input(request.environ, limit, timeout_s)


def read_input(environ: dict[str, Any], limit: int, timeout_s: float | None = None) -> bytes:
    """`read_body` for a WSGI environ (the precompiled routes read bodies without Flask)."""
    timer = gevent.Timeout(timeout_s)
    try:
        with timer:
            return _read_body(environ, limit)
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise Problem(
            408,
            "body-timeout",
            f"the body did not arrive within {timeout_s:g} s",
            headers={"Connection": "close"},
        ) from None


def _read_body(environ: dict[str, Any], limit: int) -> bytes:
    raw_length = environ.get("CONTENT_LENGTH")
    length = int(raw_length) if raw_length and raw_length.isascii() and raw_length.isdigit() else None
    if length is not None and length > limit:
        raise Problem(
            413, "body-too-large", f"body is {length} bytes; at most {limit} are allowed", limit=limit
        )
    stream = environ["wsgi.input"]
    chunks, size = [], 0
    while True:
        chunk = stream.read(min(65536, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise Problem(413, "body-too-large", f"body is over {limit} bytes", limit=limit)
    return b"".join(chunks)


def services() -> Services:
    """The Services object the app factory was given (web/app.py)."""
    services: Services = current_app.extensions["sluice"]
    return services


class RequestView(Protocol):
    """What the shared request helpers read: werkzeug's request, or the precompiled routes'
    lighter view of the environ (`web.fast.PlainRequest`)."""

    @property
    def args(self) -> Any: ...

    @property
    def headers(self) -> Any: ...

    @property
    def cookies(self) -> Any: ...

    @property
    def remote_addr(self) -> str | None: ...

    @property
    def query_string(self) -> bytes: ...


def bearer_token(
    *, allow_query: bool = False, allow_cookie: bool = False, req: RequestView | None = None
) -> str | None:
    """The request's token: `Authorization: Bearer`, else (if allowed) `?token=`, else cookie.
    `req`: a request other than Flask's current one (the precompiled routes)."""
    req = request if req is None else req
    header = req.headers.get("Authorization")
    if header:
        return parse_bearer(header)
    if allow_query and req.args.get("token"):
        return req.args["token"]
    if allow_cookie and req.cookies.get("sluice_token"):
        return req.cookies["sluice_token"]
    return None


def check_query_params(req: RequestView, max_params: int) -> None:
    """400 past `max_params` query parameters (counted only when the query could hold that
    many)."""
    if req.query_string.count(b"&") >= max_params and sum(1 for _ in req.args.items(multi=True)) > max_params:
        raise Problem(
            400, "too-many-parameters", f"at most {max_params} query parameters are allowed", limit=max_params
        )


def parse_bearer(header: str) -> str:
    """The token of an `Authorization: Bearer <token>` header (401 for any other form)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized("Authorization must be `Bearer <token>`")
    return value.strip()


def authenticate(*, allow_query: bool = False, allow_cookie: bool = False) -> Principal:
    token = bearer_token(allow_query=allow_query, allow_cookie=allow_cookie)
    if token is None:
        raise unauthorized("a token is required (Authorization: Bearer <token>)")
    return services().tokens.verify(token)


def install_error_handlers(app: Flask) -> None:
    """Every error leaves as application/problem+json, including Flask's own 404/405/413."""

    @app.errorhandler(Problem)
    def _problem(problem: Problem) -> Response:
        return problem_response(problem)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        slug = (exc.name or "error").lower().replace(" ", "-")
        headers = {}
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return problem_response(Problem(exc.code or 500, slug, exc.description or exc.name, headers=headers))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        app.logger.exception("unhandled error")
        return problem_response(internal_error())
