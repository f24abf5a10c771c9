"""Token verification: the one place a JWT is decoded (and minted, for tests and the CLI).

A token is a JWT signed with one of the server's keys (`kid` picks it; without `kid` every key
that accepts the token's algorithm is tried, which keeps rotation painless). Each key accepts
exactly one algorithm, fixed by what the key is: a shared secret HS256, an RSA public key RS256,
a P-256 public key ES256. The token's header never chooses how it is checked, so `alg: none`
and algorithm confusion (an RS256 public key used as an HS256 secret) cannot
verify. Its `publish` and `subscribe` claims are lists of stream patterns, compiled once per
token into `auth.grants.Grants`, so a permission is decided once, not per event. Verified tokens
are cached until they expire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from auth.grants import PATTERN_RE, Grants
from auth.revocations import Revocations
from common.cache import BoundedCache
from common.problems import Unavailable, unauthorized
from config.keys import load_public_key

JTI_KEY = "sluice:jti:{}"  # Redis key remembering a used single-use token until its exp


_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


def check_compact_jws(token: str) -> None:
    """One spelling per token: three base64url segments, unpadded and canonical (the unused
    low bits of the last character zero), so no two strings are the same token (a per-token
    limit or cache keyed by the string cannot be doubled by `T=` or an altered last char).
    Raises a 401 problem."""
    parts = token.split(".")
    if len(parts) != 3 or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise unauthorized("token is not a compact JWS (three unpadded base64url segments)")
    for part in parts:
        if len(part) % 4 == 1:
            raise unauthorized("token is not canonical base64url")
        try:
            raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (ValueError, binascii.Error):
            raise unauthorized("token is not canonical base64url") from None
        if base64.urlsafe_b64encode(raw).rstrip(b"=") != part.encode("ascii"):
            raise unauthorized("token is not canonical base64url")


def check_claims_text(claims: dict[str, Any]) -> None:
    """Every string in the claims is valid Unicode (JSON allows a lone surrogate such as
    `"\\ud800"`, which nothing downstream can encode): else 401, at the door."""
    try:
        orjson.dumps(claims)
    except orjson.JSONEncodeError:
        raise unauthorized("token claims hold text that is not valid Unicode") from None


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for, and what it may do."""

    subject: str
    publish: Grants
    subscribe: Grants
    expires_at: float
    claims: dict[str, Any]


class TokenVerifier:
    """Verifies tokens against the configured keys; single-use tokens are checked in Redis."""

    def __init__(
        self,
        keys: dict[str, str],
        *,
        public_keys: dict[str, str] | None = None,
        leeway_s: float = 5.0,
        redis: Any = None,
        cache_size: int = 10000,
        revocations: Revocations | None = None,
    ) -> None:
        self.revocations = revocations
        public_keys = public_keys or {}
        if not keys and not public_keys:
            raise ValueError("at least one key is required")
        clash = set(keys) & set(public_keys)
        if clash:
            raise ValueError(f"key id used twice: {sorted(clash)[0]}")
        # kid -> (key, the one algorithm it verifies)
        self.keys: dict[str, tuple[Any, str]] = {kid: (secret, "HS256") for kid, secret in keys.items()}
        for kid, pem in public_keys.items():
            self.keys[kid] = load_public_key(pem)
        self.algorithms = {alg for _, alg in self.keys.values()}
        self.leeway_s = leeway_s
        self.redis = redis
        self._cache: BoundedCache[str, Principal] = BoundedCache(cache_size)

    def verify(self, token: str) -> Principal:
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None:
            if now <= cached.expires_at + self.leeway_s:
                self._check_revoked(cached)
                return cached
            self._cache.pop(token)
            raise unauthorized("token has expired")
        principal = self._decode(token)
        self._check_revoked(principal)
        if principal.claims.get("once") is True:
            self._spend(principal)
        else:
            self._cache.put(token, principal)
        return principal

    def _check_revoked(self, principal: Principal) -> None:
        if self.revocations is not None and self.revocations.revoked(
            principal.claims.get("jti"), principal.subject, principal.claims.get("iat")
        ):
            raise unauthorized("token has been revoked")

    def _decode(self, token: str) -> Principal:
        if len(token) > 8192:
            raise unauthorized("token is too long")
        check_compact_jws(token)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthorized("token is not a valid JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or not (kid is None or isinstance(kid, str)):
            raise unauthorized("token header: `alg` and `kid` must be strings")
        if alg not in self.algorithms:
            raise unauthorized(
                f"token algorithm `{alg}` is not accepted here "
                f"(accepted: {', '.join(sorted(self.algorithms))})"
            )
        if kid is not None:
            if kid not in self.keys:
                raise unauthorized("token is signed with an unknown key (kid)")
            candidates = [self.keys[kid]]
        else:
            candidates = list(self.keys.values())
        candidates = [(key, key_alg) for key, key_alg in candidates if key_alg == alg]
        if not candidates:
            raise unauthorized(f"the key `{kid}` does not verify `{alg}` tokens")
        claims = None
        error: jwt.PyJWTError | None = None
        for key, key_alg in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[key_alg],
                    leeway=self.leeway_s,
                    options={"require": ["exp", "sub"]},
                )
                break
            except jwt.InvalidSignatureError as exc:
                error = exc
            except jwt.ExpiredSignatureError:
                raise unauthorized("token has expired") from None
            except jwt.ImmatureSignatureError:
                raise unauthorized("token is not valid yet (nbf)") from None
            except jwt.MissingRequiredClaimError as exc:
                raise unauthorized(f"token lacks the `{exc.claim}` claim") from None
            except jwt.PyJWTError as exc:
                raise unauthorized(f"token is invalid: {exc}") from None
        if claims is None:
            raise unauthorized("token signature does not verify") from error
        check_claims_text(claims)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 200 or "\x00" in sub:
            raise unauthorized("token `sub` must be a non-empty string of at most 200 characters")
        return Principal(
            sub,
            self._grants(claims, "publish"),
            self._grants(claims, "subscribe"),
            float(claims["exp"]),
            claims,
        )

    @staticmethod
    def _grants(claims: dict[str, Any], name: str) -> Grants:
        patterns = claims.get(name, [])
        if not isinstance(patterns, list) or not all(
            isinstance(p, str) and PATTERN_RE.fullmatch(p) for p in patterns
        ):
            raise unauthorized(f"token `{name}` must be a list of stream patterns")
        try:
            return Grants(patterns)
        except ValueError as exc:
            raise unauthorized(f"token `{name}`: {exc}") from None

    def _spend(self, principal: Principal) -> None:
        """Remember a single-use token's jti until it expires; refuse it if already used."""
        jti = principal.claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 200:
            raise unauthorized("a single-use token needs a `jti`")
        if self.redis is None:
            raise Unavailable("single-use tokens need Redis", slug="redis-unavailable")
        redis_key = JTI_KEY.format(principal.subject + "\x00" + jti)
        try:
            fresh = self.redis.set(
                redis_key, b"1", nx=True, exat=int(principal.expires_at + self.leeway_s) + 1
            )
        except Exception as exc:
            raise Unavailable("cannot check a single-use token right now", slug="redis-unavailable") from exc
        if not fresh:
            raise unauthorized("single-use token was already used")
        ledger = self.revocations.ledger if self.revocations is not None else None
        if ledger is None:
            return
        try:  # Redis may have restarted empty since it was spent: the ledger remembers
            key = hashlib.sha256((principal.subject + "\x00" + jti).encode("utf-8", "surrogatepass"))
            fresh = ledger.spend(key.hexdigest(), principal.expires_at + self.leeway_s + 1)
        except Exception as exc:
            try:  # not recorded durably: not spent either (the client may try again)
                self.redis.delete(redis_key)
            except Exception:  # noqa: BLE001 - it stays refused: closed, not open
                pass
            raise Unavailable(
                "cannot check a single-use token right now", slug="database-unavailable"
            ) from exc
        if not fresh:
            raise unauthorized("single-use token was already used")


def mint(
    key: str,
    subject: str,
    *,
    publish: Sequence[str] = (),
    subscribe: Sequence[str] = (),
    ttl_s: float = 3600,
    kid: str | None = None,
    **claims: Any,
) -> str:
    """Make a token (for the dev banner, tests and origins written in Python)."""
    now = int(time.time())
    payload = {
        "sub": subject,
        "iat": now,
        "exp": now + int(ttl_s),
        "publish": list(publish),
        "subscribe": list(subscribe),
        **claims,
    }
    return jwt.encode(payload, key, algorithm="HS256", headers={"kid": kid} if kid else None)
