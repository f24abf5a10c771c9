"""Mercure's JWTs: one key for publishers and one for subscribers (the reference hub's
`MERCURE_PUBLISHER_JWT_KEY` / `MERCURE_SUBSCRIBER_JWT_KEY` with their `_ALG`), claims under
`mercure` (`publish`, `subscribe`, `payload`), `exp` optional but enforced when present.

As on the native door, the algorithm is fixed by the configured key, never chosen by the
token's header, and verified tokens are cached until they expire. Revocations by `jti` or
subject (`POST /api/v1/revocations`) apply here too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from auth.revocations import Revocations
from auth.tokens import check_claims_text, check_compact_jws
from common.cache import BoundedCache
from common.problems import unauthorized
from config.keys import load_public_key


@dataclass(frozen=True)
class MercureClaims:
    """What a verified Mercure token allows (None: the claim is absent)."""

    publish: tuple[str, ...] | None
    subscribe: tuple[str, ...] | None
    payload: Any
    expires_at: float  # unix time; 0: no `exp`
    jti: str | None
    subject: str
    issued_at: float | None


ANONYMOUS = MercureClaims(None, None, None, 0.0, None, "", None)


def _selectors(claim: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = claim.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise unauthorized(f"token claim `mercure.{name}` must be a list of topic selectors")
    return tuple(value)


class MercureKey:
    """One configured key: an HS256 secret, or a PEM public key for RS256/ES256."""

    def __init__(self, key: str, alg: str) -> None:
        alg = alg.upper()
        if alg == "HS256":
            self.key: Any = key
        elif alg in ("RS256", "ES256"):
            self.key, key_alg = load_public_key(key.replace("\\n", "\n"))
            if key_alg != alg:
                raise ValueError(f"the key is for {key_alg}, not {alg}")
        else:
            raise ValueError(f"algorithm must be HS256, RS256 or ES256, got {alg!r}")
        self.alg = alg


class MercureTokens:
    """Verifies one kind of Mercure token (publisher or subscriber)."""

    def __init__(
        self,
        key: MercureKey,
        *,
        leeway_s: float = 5.0,
        revocations: Revocations | None = None,
        cache_size: int = 10000,
    ) -> None:
        self.key = key
        self.leeway_s = leeway_s
        self.revocations = revocations
        self._cache: BoundedCache[str, MercureClaims] = BoundedCache(cache_size)

    def verify(self, token: str) -> MercureClaims:
        claims = self._cache.get(token)
        if claims is None:
            claims = self._decode(token)
            self._cache.put(token, claims, time.monotonic() + 300)
        if claims.expires_at and time.time() > claims.expires_at + self.leeway_s:
            self._cache.pop(token)
            raise unauthorized("token has expired")
        if self.revocations is not None and self.revocations.revoked(
            claims.jti, claims.subject, claims.issued_at
        ):
            raise unauthorized("token has been revoked")
        return claims

    def _decode(self, token: str) -> MercureClaims:
        if len(token) > 8192:
            raise unauthorized("token is too long")
        check_compact_jws(token)
        try:
            decoded = jwt.decode(
                token, self.key.key, algorithms=[self.key.alg], leeway=self.leeway_s, options={"require": []}
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("token has expired") from None
        except jwt.InvalidAlgorithmError:
            raise unauthorized(f"token must be signed with {self.key.alg}") from None
        except jwt.PyJWTError as exc:
            raise unauthorized(f"token is invalid: {exc}") from None
        check_claims_text(decoded)
        claim = decoded.get("mercure")
        if claim is None:
            claim = {}
        if not isinstance(claim, dict):
            raise unauthorized("token claim `mercure` must be an object")
        exp, iat, jti, sub = (decoded.get(k) for k in ("exp", "iat", "jti", "sub"))
        return MercureClaims(
            _selectors(claim, "publish"),
            _selectors(claim, "subscribe"),
            claim.get("payload"),
            float(exp) if isinstance(exp, (int, float)) else 0.0,
            jti if isinstance(jti, str) else None,
            sub if isinstance(sub, str) else "",
            float(iat) if isinstance(iat, (int, float)) else None,
        )
