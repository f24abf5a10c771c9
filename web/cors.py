"""CORS for pages on other origins (EventSource `withCredentials`, fetch, XHR long-poll).

`CORS_ORIGINS` lists the origins allowed. A listed origin is echoed back with
`Access-Control-Allow-Credentials: true`, so cookies and `withCredentials` work; `*` allows any
origin but never with credentials (browsers refuse that pair, and it would hand every site a
logged-in user's events). Requests from other origins get no CORS headers, so browsers do not
let the page read the answer, and their preflights are refused with `403`.
"""

from __future__ import annotations

from collections.abc import Sequence

from flask import Flask, Response, request

from common.problems import Problem

ALLOWED_METHODS = "GET, POST, PUT, DELETE"
ALLOWED_HEADERS = (
    "authorization",
    "content-type",
    "last-event-id",
    "idempotency-key",
    "cache-control",
    "x-requested-with",
)
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate, Last-Event-ID"
PREFLIGHT_MAX_AGE_S = "600"


def install_cors(app: Flask, origins: Sequence[str]) -> None:
    if not origins:
        return
    listed = frozenset(o for o in origins if o != "*")
    anyone = "*" in origins

    def allow(origin: str) -> dict[str, str]:
        if origin in listed:
            return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}
        if anyone:
            return {"Access-Control-Allow-Origin": "*"}
        return {}

    @app.before_request
    def _preflight() -> Response | None:
        origin = request.headers.get("Origin")
        wanted = request.headers.get("Access-Control-Request-Method")
        if request.method != "OPTIONS" or not origin or not wanted:
            return None
        headers = allow(origin)
        if not headers:
            raise Problem(
                403,
                "origin-not-allowed",
                f"origin `{origin[:200]}` may not call this server (CORS_ORIGINS)",
                headers={"Vary": "Origin"},
            )
        asked = [
            h.strip().lower()
            for h in request.headers.get("Access-Control-Request-Headers", "").split(",")
            if h.strip()
        ]
        refused = [h for h in asked if h not in ALLOWED_HEADERS]
        if refused:
            raise Problem(
                403,
                "header-not-allowed",
                f"header `{refused[0][:100]}` is not allowed cross-origin",
                headers={"Vary": "Origin"},
            )
        headers.update(
            {
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ", ".join(ALLOWED_HEADERS),
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S,
                "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            }
        )
        return Response(status=204, headers=headers)

    @app.after_request
    def _headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and "Access-Control-Allow-Origin" not in response.headers:
            response.headers.update(allow(origin))
            if "Access-Control-Allow-Origin" in response.headers:
                response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        response.vary.add("Origin")
        return response
