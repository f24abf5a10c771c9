"""Checking the `Sluice-Signature` header of a subscription webhook (`t=<unix>,v1=<hex>`:
HMAC-SHA256 over `<t>.` followed by the raw body)."""

from __future__ import annotations

import hashlib
import hmac
import time


def webhook_secret(sluice_secret: str) -> str:
    """The secret Sluice signs notices with when `SLUICE_WEBHOOK_SECRET` is not set: derived
    from `SLUICE_SECRET` (never the token key itself)."""
    return hmac.new(sluice_secret.encode(), b"sluice webhook signing key v1", hashlib.sha256).hexdigest()


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The header value Sluice sends for `body` at `timestamp` (for tests of your endpoint)."""
    mac = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_webhook(
    secret: str, body: bytes, header: str | None, *, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """True if `header` signs exactly `body` with `secret` and was made within `tolerance_s`
    of now (a replayed old notice fails). Compared in constant time; pass the raw body bytes,
    not a re-encoded JSON."""
    if not header:
        return False
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if sep:
            fields.setdefault(name, []).append(value)
    stamps = fields.get("t", [])
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    timestamp = int(stamps[0])
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = signature(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected.encode(), v.encode()) for v in fields.get("v1", []))
