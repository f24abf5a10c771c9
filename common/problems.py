"""Errors as RFC 9457 problem details, and the well-known ones by name.

A leaf: it imports nothing of Sluice, so the core (store, batcher, auth, hub) raises `Problem`s
without knowing about HTTP; the HTTP layer (`web.http`) renders them as `application/problem+json`.
A problem that more than one place raises is a function here, built in one place only.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

PROBLEM_TYPE_BASE = "https://sluice.dev/problems/"

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """An error with an HTTP status, a machine-readable slug and a human sentence."""

    def __init__(
        self, status: int, slug: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.slug,
            "title": TITLES.get(self.status) or _phrase(self.status),
            "status": self.status,
            "detail": self.detail,
        }
        body.update({k: v for k, v in self.extra.items() if v is not None})
        return body


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Unavailable(Problem):
    """The database or the ingest backlog cannot take more right now; the client retries later."""

    def __init__(self, detail: str, retry_after: int = 1, slug: str = "unavailable") -> None:
        super().__init__(503, slug, detail, headers={"Retry-After": str(retry_after)})


# -- the named problems ----------------------------------------------------------------------


def internal_error() -> Problem:
    """500: an unexpected error (logged; the client learns nothing more)."""
    return Problem(500, "internal-error", "an unexpected error occurred")


def unauthorized(detail: str) -> Problem:
    """401: no token, or one that does not verify (expired, reused, badly signed, ...)."""
    return Problem(401, "invalid-token", detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def not_granted(action: str, stream: str, index: int | None = None) -> Problem:
    """403: the credential's `publish` or `subscribe` grant does not cover `stream`."""
    return Problem(
        403, "not-granted", f"the token does not grant `{action}` on `{stream}`", stream=stream, index=index
    )


def unknown_stream(stream: str) -> Problem:
    """404: the stream was never created (or was deleted)."""
    return Problem(404, "unknown-stream", f"stream `{stream}` does not exist", stream=stream)


def invalid_parameter(field: str, detail: str) -> Problem:
    """400: a query parameter has a value Sluice cannot use."""
    return Problem(400, "invalid-parameter", detail, field=field)
