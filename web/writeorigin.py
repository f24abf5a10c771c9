"""Cookies read; writes need the right origin (CSRF). A browser attaches cookies to a form a
foreign page submits, so a write authenticated by a cookie alone is accepted only when the
browser says where it comes from and that place is allowed: `Origin`, else `Sec-Fetch-Site`,
else `Referer`. A write carrying none of them is refused too (a browser always sends one of
them on a cross-site POST; other clients send their token in a header instead)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol
from urllib.parse import urlsplit

from common.problems import Problem


class HeaderSource(Protocol):
    def get(self, name: str) -> str | None: ...


def _origin_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def check_write_origin(
    headers: HeaderSource,
    allowed: Collection[str],
    own_host: str,
) -> None:
    """Raise a 403 problem unless the browser's own account of the write's origin is allowed
    (`allowed`: `https://host[:port]` entries or `*`; `own_host`: this server's Host)."""
    allowed_lower = {a.lower() for a in allowed}

    def ok(origin: str | None) -> bool:
        if origin is None:
            return False
        return (
            "*" in allowed_lower or origin in allowed_lower or origin.split("://", 1)[1] == own_host.lower()
        )

    origin = headers.get("Origin")
    if origin is not None:
        if ok(_origin_of(origin)):  # `null` (a sandboxed or file page) never is
            return
        raise Problem(
            403,
            "cross-origin-write",
            f"a write authenticated by a cookie is not accepted from the origin {origin[:200]!r}",
            field="Origin",
        )
    site = (headers.get("Sec-Fetch-Site") or "").lower()
    if site:
        if site in ("same-origin", "none") or "*" in allowed_lower:
            return
        raise Problem(
            403,
            "cross-origin-write",
            f"a write authenticated by a cookie is not accepted from a {site} page",
            field="Sec-Fetch-Site",
        )
    referer = headers.get("Referer")
    if referer is not None and ok(_origin_of(referer)):
        return
    raise Problem(
        403,
        "cross-origin-write",
        "a write authenticated by a cookie needs an "
        "allowed `Origin` (or `Referer`); send the token in `Authorization` instead",
        field="Origin",
    )
