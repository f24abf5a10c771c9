"""Errors as RFC 9457 problem details: one exception type the HTTP layer turns into a response.

Services raise `Problem` (or subclasses) without knowing about Flask; `web.app` renders them.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

PROBLEM_TYPE_BASE = "https://sluice.dev/problems/"

TITLES = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 409: "Conflict", 413: "Content Too Large",
    415: "Unsupported Media Type", 429: "Too Many Requests", 500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """An error with an HTTP status, a machine-readable slug and a human sentence."""

    def __init__(self, status: int, slug: str, detail: str, *, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body = {
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
