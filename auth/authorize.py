"""Origin authorization: a subscriber without a token is vouched for by the origin.

With `SLUICE_AUTHORIZE_URL` set, a subscribe request that carries no token is described to the
origin — a `POST` with `{"streams": [...]}`, the client's address in `X-Forwarded-For`, and the
request headers named by `AUTHORIZE_FORWARD_HEADERS` (its cookies by default) — before anything
is sent to the client. The origin answers:

- 2xx with JSON `{"streams": ["pattern", ...], "ttl": seconds, "sub": "user-1"}`: the
  subscription may have the streams the patterns cover (the same patterns as a token's
  `subscribe` claim); the answer is cached for `ttl` (capped by `AUTHORIZE_MAX_TTL_S`), in this
  process and in Redis for the others, so reconnects and other tabs do not ask again;
- 4xx: refused; the client gets the same status as a problem body (the origin's `detail` when it
  sent a problem body), which makes EventSource stop;
- anything else, a body Sluice cannot use, no answer within `AUTHORIZE_TIMEOUT_S`, or no
  connection: `OriginUnavailable`, which SSE turns into a `retry:` and long-poll into a `503`.

Concurrent checks for the same headers and streams share one origin request.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from gevent.event import AsyncResult

from auth.grants import Grants, valid_pattern
from auth.revocations import Revocations
from auth.tokens import Principal
from common.cache import BoundedCache
from common.origin import OriginClient, OriginError
from common.problems import Problem

REDIS_KEY = "{}:authz:{}"  # namespace (the deployment's), question
CACHE_MAX = 10000
MAX_ANSWER_BYTES = 65536


class OriginUnavailable(Exception):
    """The origin could not give a usable answer in time; the client should come back later."""


@dataclass(frozen=True)
class Grant:
    subject: str
    patterns: tuple[str, ...]
    expires_at: float  # wall clock, as a token's exp
    granted_at: float = 0.0  # when the origin answered: the grant's `iat` for revocations

    def principal(self) -> Principal:
        return Principal(
            self.subject,
            Grants(()),
            Grants(self.patterns),
            self.expires_at,
            {"sub": self.subject, "iat": self.granted_at, "authorized_by": "origin"},
        )


class OriginAuthorizer:
    """Asks `url` whether a token-less subscriber may have its streams; caches the grants."""

    def __init__(
        self,
        url: str,
        *,
        forward_headers: Sequence[str],
        timeout_s: float,
        max_ttl_s: float,
        redis: Any = None,
        metrics: Any = None,
        revocations: Revocations | None = None,
        namespace: str = "sluice",
    ) -> None:
        self.origin = OriginClient(
            url, timeout_s=timeout_s, user_agent="sluice-authorize", max_answer_bytes=MAX_ANSWER_BYTES
        )
        self.forward_headers = tuple(forward_headers)
        self.timeout_s = timeout_s
        self.max_ttl_s = max_ttl_s
        self.redis = redis
        self.metrics = metrics
        self.revocations = revocations
        self.ns = namespace
        self._cache: BoundedCache[str, Grant] = BoundedCache(CACHE_MAX)
        self._inflight: dict[str, AsyncResult] = {}

    def authorize(
        self, headers: Mapping[str, str], streams: Sequence[str], address: str | None
    ) -> tuple[Principal, str]:
        """The principal the origin grants for these streams, and the key that identifies the
        forwarded credentials (for per-credential limits). Raises Problem or OriginUnavailable."""
        # `headers` is keyed by lower-case name (HTTP header names are case-insensitive).
        forwarded = {
            name: headers[name.lower()] for name in self.forward_headers if headers.get(name.lower())
        }
        credentials = hashlib.sha256(orjson.dumps(sorted(forwarded.items()))).hexdigest()
        key = hashlib.sha256(f"{credentials}\n{chr(10).join(sorted(streams))}".encode()).hexdigest()
        grant = self._cached(key)
        if grant is None:
            waiting = self._inflight.get(key)
            if waiting is not None:
                grant = waiting.get()  # another greenlet is asking the origin: share its answer
            else:
                result = self._inflight[key] = AsyncResult()
                try:
                    grant = self._ask(key, forwarded, streams, address)
                    result.set(grant)
                except BaseException as exc:
                    result.set_exception(exc)
                    raise
                finally:
                    self._inflight.pop(key, None)
        elif self.metrics is not None:
            self.metrics.labels("cached").inc()
        return grant.principal(), "origin:" + credentials[:32]

    # -- cache ---------------------------------------------------------------------------

    def _cached(self, key: str) -> Grant | None:
        now = time.time()
        grant = self._cache.get(key)
        if grant is not None:
            if grant.expires_at > now and not self._revoked(key, grant, shared=False):
                return grant
            self._cache.pop(key)
        if self.redis is None:
            return None
        try:
            raw = self.redis.get(REDIS_KEY.format(self.ns, key))
        except Exception:  # noqa: BLE001 - Redis is only a shared cache here
            return None
        if not raw:
            return None
        try:
            data = orjson.loads(raw)
            grant = Grant(
                str(data["sub"]), tuple(data["streams"]), float(data["exp"]), float(data.get("iat", 0.0))
            )
        except (ValueError, KeyError, TypeError):
            return None
        if grant.expires_at <= now or self._revoked(key, grant, shared=True):
            return None
        self._remember(key, grant)
        return grant

    def _revoked(self, key: str, grant: Grant, *, shared: bool) -> bool:
        """A grant the origin gave before its subject was revoked is dropped (from this
        process, or from Redis when that is where it was read), so the next subscribe asks
        the origin again (or uses a grant another process asked for since)."""
        if self.revocations is None or not self.revocations.revoked(None, grant.subject, grant.granted_at):
            return False
        self._cache.pop(key)
        if shared and self.redis is not None:
            try:
                self.redis.delete(REDIS_KEY.format(self.ns, key))
            except Exception:  # noqa: BLE001 - every process drops it on sight anyway
                pass
        return True

    def _remember(self, key: str, grant: Grant) -> None:
        self._cache.put(key, grant)

    # -- the origin ----------------------------------------------------------------------

    def _ask(self, key: str, forwarded: dict[str, str], streams: Sequence[str], address: str | None) -> Grant:
        body = orjson.dumps({"streams": list(streams)})
        headers = {**forwarded, "Content-Type": "application/json", "Accept": "application/json"}
        if address:
            headers["X-Forwarded-For"] = address
        try:
            reply = self.origin.post(body, headers)
        except OriginError as exc:
            self._count("unavailable")
            raise OriginUnavailable(f"the origin did not answer: {exc}") from None
        status, content_type, answer = reply.status, reply.content_type, reply.body
        if 400 <= status < 500:
            self._count("denied")
            raise self._refusal(status, content_type, answer)
        if not 200 <= status < 300:
            self._count("unavailable")
            raise OriginUnavailable(f"the origin answered {status}")
        grant = self._grant(answer)
        if grant is None:
            self._count("unavailable")
            raise OriginUnavailable(
                'the origin\'s 2xx answer is not {"streams": [...], "ttl": s, "sub": "..."}'
            )
        self._count("granted")
        if grant.expires_at > time.time():
            self._remember(key, grant)
            if self.redis is not None:
                try:
                    ttl_ms = max(1, int((grant.expires_at - time.time()) * 1000))
                    self.redis.set(
                        REDIS_KEY.format(self.ns, key),
                        orjson.dumps(
                            {
                                "sub": grant.subject,
                                "streams": grant.patterns,
                                "exp": grant.expires_at,
                                "iat": grant.granted_at,
                            }
                        ),
                        px=ttl_ms,
                    )
                except Exception:  # noqa: BLE001 - the process cache still has it
                    pass
        return grant

    def _grant(self, answer: bytes) -> Grant | None:
        if len(answer) > MAX_ANSWER_BYTES:
            return None
        try:
            data = orjson.loads(answer)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        patterns, ttl, subject = data.get("streams"), data.get("ttl", 0), data.get("sub", "origin")
        if not isinstance(patterns, list) or not all(
            isinstance(p, str) and valid_pattern(p) for p in patterns
        ):
            return None
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0:
            return None
        if not isinstance(subject, str) or not 0 < len(subject) <= 200:
            return None
        now = time.time()
        return Grant(subject, tuple(patterns), now + min(float(ttl), self.max_ttl_s), now)

    @staticmethod
    def _refusal(status: int, content_type: str, answer: bytes) -> Problem:
        detail = f"the origin refused this subscription ({status})"
        if "json" in content_type:
            try:
                data = orjson.loads(answer)
            except ValueError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("detail"), str):
                detail = data["detail"][:500]
        return Problem(status, "origin-refused", detail)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.labels(outcome).inc()
