"""Token revocation ("be paranoid: drop connections and force resubscription").

An origin revokes one token (by `jti`) or every token of a subject issued up to now (by `sub`,
compared with the token's `iat`). A revocation is written durably first (the `Ledger`:
Postgres), then to Redis (two hashes, the fast path) and announced on a channel; every process
keeps them in memory, so checking a token costs a dictionary lookup, and on the announcement
ends the live connections the revoked tokens admitted (`on_revoke`, the hub's). A jti is
remembered for `keep_s` (longer than any token should live); a subject's cut-off likewise.

It fails closed. A process accepts no token until it has loaded the revocations from the
ledger (until then a check answers `503`). Loading merges, never replaces: a Redis that
comes back empty erases nothing a process knows, and what it lacks is written back to it.
Without Redis a revocation cannot reach the fleet at once, so it is refused (503) rather than
silently partial (it is kept in the ledger all the same, and every process loads it within
`reload_s`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent
import orjson

from common.problems import Unavailable
from common.pubsub import subscribe_forever

log = logging.getLogger("sluice.revocations")

RevokeListener = Callable[[str, str, float], object]  # (kind "jti" | "sub", value, at)


class Ledger(Protocol):
    """Where revocations and spent single-use tokens are kept durably (ingest.ledger)."""

    def record(self, kind: str, value: str, at: float) -> None: ...

    def entries(self, jti_after: float, sub_after: float) -> list[tuple[str, str, float]]: ...

    def spend(self, key: str, until: float) -> bool: ...


class Revocations:
    """Revoked jtis and subjects, in memory for every token check, shared through Redis and
    kept in the ledger."""

    def __init__(
        self,
        redis: Any,
        *,
        namespace: str,
        keep_s: float = 86400.0,
        reload_s: float = 10.0,
        ledger: Ledger | None = None,
    ) -> None:
        self.redis = redis
        self.ns = namespace
        self.keep_s = keep_s
        self.reload_s = reload_s
        self.ledger = ledger
        self.jtis: dict[str, float] = {}  # jti -> remembered until (unix time)
        self.subjects: dict[str, float] = {}  # sub -> tokens issued at or before this are out
        self.listeners: list[RevokeListener] = []
        self.ready = False  # loaded once from the ledger (or Redis, alone)
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> Revocations:
        self._reload_quietly()
        self._greenlets = [
            gevent.spawn(
                subscribe_forever,
                self.redis,
                f"{self.ns}:revocations",
                self._message,
                on_up=self._reload_quietly,
            ),
            gevent.spawn(self._reload_forever),
        ]
        return self

    def stop(self) -> None:
        gevent.killall(self._greenlets, block=False)

    # -- checks -------------------------------------------------------------------------------
    def revoked(self, jti: Any, subject: str, issued_at: Any) -> bool:
        """Is a token with these claims revoked? (no I/O; 503 until the tables are loaded)"""
        if not self.ready:
            raise Unavailable(
                "revocations are not loaded yet, so no token can be checked",
                retry_after=2,
                slug="revocations-unavailable",
            )
        if isinstance(jti, str) and jti in self.jtis:
            return True
        cut = self.subjects.get(subject)
        if cut is None:
            return False
        return not isinstance(issued_at, (int, float)) or issued_at <= cut

    def still_admits(self, jti: Any, subject: str, issued_at: Any) -> bool:
        """For a subscription that has just registered (no I/O, never raises): not revoked,
        and the tables are loaded. Checked after registering, so a revocation that lands
        between a connection's token check and its registration still ends it."""
        return self.ready and not self.revoked(jti, subject, issued_at)

    # -- revoking -----------------------------------------------------------------------------
    def revoke(self, kind: str, value: str) -> float:
        """Revoke a jti or a subject in every process; returns the time it took effect."""
        now = time.time()
        field = f"{self.ns}:revoked-{kind}"
        stored = now + self.keep_s if kind == "jti" else now
        if self.ledger is not None:
            try:
                self.ledger.record(kind, value, stored)
            except Exception as exc:
                raise Unavailable(
                    "revocations need the database, which is unreachable",
                    retry_after=2,
                    slug="database-unavailable",
                ) from exc
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(field, value, repr(stored))
                pipe.publish(
                    f"{self.ns}:revocations", orjson.dumps({"kind": kind, "value": value, "at": stored})
                )
                pipe.execute()
        except Exception as exc:
            self._apply(kind, value, stored)  # kept: here now, everywhere at the next reload
            raise Unavailable(
                "revocations need Redis, which is unreachable", retry_after=2, slug="redis-unavailable"
            ) from exc
        self._apply(kind, value, stored)
        return now

    def _message(self, data: bytes) -> None:
        doc = orjson.loads(data)
        self._apply(doc["kind"], doc["value"], float(doc["at"]))

    def _apply(self, kind: str, value: str, at: float) -> None:
        table = self.jtis if kind == "jti" else self.subjects
        known = table.get(value)
        if known is not None and known >= at:
            return  # ours announced back to us, or already known (a merge never goes back)
        table[value] = at
        for listener in self.listeners:
            try:
                listener(kind, value, at)
            except Exception:
                log.exception("revocation listener failed")

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> None:
        """Merge what the ledger and Redis hold into the in-memory tables (never dropping what
        is known, but what has expired), write back to Redis what it lacks, and be ready once
        the ledger (or, without one, Redis) has been read. Raises if neither could be read."""
        now = time.time()
        found: list[tuple[str, str, float]] = []
        errors: list[Exception] = []
        ledger_read = False
        if self.ledger is not None:
            try:
                found += self.ledger.entries(now, now - self.keep_s)
                ledger_read = True
            except Exception as exc:  # noqa: BLE001 - Redis may still answer
                errors.append(exc)
        in_redis: set[tuple[str, str]] = set()
        redis_read = False
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(f"{self.ns}:revoked-jti")
                pipe.hgetall(f"{self.ns}:revoked-sub")
                jtis, subjects = pipe.execute()
            stale: dict[str, list[bytes]] = {"jti": [], "sub": []}
            for kind, table in (("jti", jtis), ("sub", subjects)):
                for k, v in table.items():
                    at = float(v)
                    if (at > now) if kind == "jti" else (at + self.keep_s > now):
                        found.append((kind, k.decode(), at))
                        in_redis.add((kind, k.decode()))
                    else:
                        stale[kind].append(k)
            redis_read = True
            if stale["jti"] or stale["sub"]:
                with self.redis.pipeline(transaction=False) as pipe:
                    for kind, keys in stale.items():
                        if keys:
                            pipe.hdel(f"{self.ns}:revoked-{kind}", *keys)
                    pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the ledger may have answered
            errors.append(exc)
        for kind, value, at in found:
            if (at > now) if kind == "jti" else (at + self.keep_s > now):
                self._apply(kind, value, at)
        self._expire(now)
        if redis_read:
            self._write_back(in_redis)
        if ledger_read or (self.ledger is None and redis_read):
            self.ready = True
        elif errors:
            raise errors[0]

    def _expire(self, now: float) -> None:
        self.jtis = {k: v for k, v in self.jtis.items() if v > now}
        self.subjects = {k: v for k, v in self.subjects.items() if v + self.keep_s > now}

    def _write_back(self, in_redis: set[tuple[str, str]]) -> None:
        """Give a Redis that lost its hashes (restarted without persistence) what it lacks."""
        missing = [
            (kind, value, at)
            for kind, table in (("jti", self.jtis), ("sub", self.subjects))
            for value, at in table.items()
            if (kind, value) not in in_redis
        ]
        if not missing:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for kind, value, at in missing:
                    pipe.hset(f"{self.ns}:revoked-{kind}", value, repr(at))
                pipe.execute()
        except Exception:  # noqa: BLE001 - the next reload tries again
            pass

    def _reload_quietly(self) -> None:
        try:
            self.load()  # announcements may have been missed while the subscription was down
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning(
                "revocations: could not load (%s)%s",
                exc,
                "" if self.ready else "; tokens are refused (503) until they load",
            )

    def _reload_forever(self) -> None:
        while True:
            gevent.sleep(self.reload_s)
            self._reload_quietly()
