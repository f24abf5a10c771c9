"""HTTP for revocation: `POST /api/v1/revocations` with `{"jti": "..."}` or `{"sub": "..."}`,
authorized by a token carrying `"revoke": true`. Every connection the revoked token(s) admitted,
in every process, ends with a final `retry:`; the token(s) are refused (401) from then on."""

from __future__ import annotations

import datetime as dt

import orjson
from flask import Blueprint, Response

from common.problems import Problem, Unavailable
from web.http import authenticate, json_response, read_body, services

bp = Blueprint("auth", __name__)
VALUE_MAX = 200


def _bad(detail: str, field: str | None = None) -> Problem:
    return Problem(400, "invalid-revocation", detail, field=field)


def parse_revocation(body: bytes) -> tuple[str, str]:
    """("jti" | "sub", value) from the body, or a 400 problem."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in ("jti", "sub"):
        raise _bad('the body is {"jti": "..."} or {"sub": "..."}, one of the two')
    kind, value = next(iter(doc.items()))
    if not isinstance(value, str) or not 0 < len(value) <= VALUE_MAX or "\x00" in value:
        raise _bad(f"`{kind}` must be a string of 1 to {VALUE_MAX} characters", field=kind)
    return kind, value


@bp.post("/api/v1/revocations")
def revoke() -> Response:
    svc = services()
    principal = authenticate()
    if principal.claims.get("revoke") is not True:
        raise Problem(403, "not-granted", "revoking needs a token with the `revoke` claim")
    kind, value = parse_revocation(read_body(4096, svc.settings.body_timeout_s))
    if svc.revocations is None:
        raise Unavailable("revocations need Redis", slug="redis-unavailable")
    at = svc.revocations.revoke(kind, value)
    when = dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="milliseconds")
    revoked = {"jti": value} if kind == "jti" else {"sub": value, "issuedUpTo": when}
    return json_response({"revoked": revoked, "at": when}, 202)
