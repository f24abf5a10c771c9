"""Minting the tokens an origin hands to its users and services."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import jwt

ALGORITHMS = ("HS256", "RS256", "ES256")


def mint_token(
    key: Any,
    subject: str,
    *,
    publish: Sequence[str] = (),
    subscribe: Sequence[str] = (),
    ttl_s: float = 3600,
    algorithm: str = "HS256",
    kid: str | None = None,
    jti: str | None = None,
    **claims: Any,
) -> str:
    """A Sluice token for `subject` with stream patterns to publish and subscribe to.

    `key` is the shared secret for HS256, or a private key (PEM text or a `cryptography` key
    object; install `sluice-client[crypto]`) for RS256 / ES256, whose public half is in the
    server's `SLUICE_PUBLIC_KEYS`. `kid` names the server key that verifies it. Every token
    gets a `jti` (so it can be revoked alone) unless one is given; extra claims pass through
    (e.g. `once=True` for a single-use token, `revoke=True` for an operator's token).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}")
    if not subject or len(subject) > 200:
        raise ValueError("subject must be 1 to 200 characters")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": subject,
        "iat": now,
        "exp": now + int(ttl_s),
        "jti": jti or uuid.uuid4().hex,
        "publish": list(publish),
        "subscribe": list(subscribe),
        **claims,
    }
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def mint_mercure_token(
    key: Any,
    *,
    publish: Sequence[str] | None = None,
    subscribe: Sequence[str] | None = None,
    payload: Any = None,
    ttl_s: float | None = 3600,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A token for Sluice's Mercure door (`mercure.publish` / `mercure.subscribe` selectors),
    signed with the key set as MERCURE_PUBLISHER_JWT_KEY or MERCURE_SUBSCRIBER_JWT_KEY."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}")
    mercure: dict[str, Any] = {}
    if publish is not None:
        mercure["publish"] = list(publish)
    if subscribe is not None:
        mercure["subscribe"] = list(subscribe)
    if payload is not None:
        mercure["payload"] = payload
    body: dict[str, Any] = {"mercure": mercure, **claims}
    if ttl_s is not None:
        body["exp"] = int(time.time() + ttl_s)
    return jwt.encode(body, key, algorithm=algorithm)
