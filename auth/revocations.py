"""Token revocation ("be paranoid: drop connections and force resubscription").

An origin revokes one token (by `jti`) or every token of a subject issued up to now (by `sub`,
compared with the token's `iat`). A revocation is written to Redis (two hashes, so a process
that starts later loads them) and announced on a channel; every process keeps them in memory,
so checking a token costs a dictionary lookup, and on the announcement ends the live
connections the revoked tokens admitted (`on_revoke`, the hub's). A jti is remembered for
`keep_s` (longer than any token should live); a subject's cut-off likewise. Without Redis a
revocation cannot reach the fleet, so it is refused (503) rather than silently partial.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import orjson

from common.problems import Unavailable
from common.pubsub import subscribe_forever

log = logging.getLogger("sluice.revocations")

RevokeListener = Callable[[str, str, float], object]  # (kind "jti" | "sub", value, at)


class Revocations:
    """Revoked jtis and subjects, in memory for every token check, shared through Redis."""

    def __init__(self, redis: Any, *, namespace: str, keep_s: float = 86400.0,
                 reload_s: float = 30.0) -> None:
        self.redis = redis
        self.ns = namespace
        self.keep_s = keep_s
        self.reload_s = reload_s
        self.jtis: dict[str, float] = {}       # jti -> remembered until (unix time)
        self.subjects: dict[str, float] = {}   # sub -> tokens issued at or before this are out
        self.listeners: list[RevokeListener] = []
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> Revocations:
        try:
            self.load()
        except Exception as exc:  # noqa: BLE001 - loaded again on the next round
            log.warning("revocations: could not load from redis (%s)", exc)
        self._greenlets = [
            gevent.spawn(subscribe_forever, self.redis, f"{self.ns}:revocations", self._message,
                         on_up=self._reload_quietly),
            gevent.spawn(self._reload_forever)]
        return self

    def stop(self) -> None:
        gevent.killall(self._greenlets, block=False)

    # -- checks -------------------------------------------------------------------------------
    def revoked(self, jti: Any, subject: str, issued_at: Any) -> bool:
        """Is a token with these claims revoked? (no I/O)"""
        if isinstance(jti, str) and jti in self.jtis:
            return True
        cut = self.subjects.get(subject)
        if cut is None:
            return False
        return not isinstance(issued_at, (int, float)) or issued_at <= cut

    # -- revoking -----------------------------------------------------------------------------
    def revoke(self, kind: str, value: str) -> float:
        """Revoke a jti or a subject in every process; returns the time it took effect."""
        now = time.time()
        field = f"{self.ns}:revoked-{kind}"
        stored = now + self.keep_s if kind == "jti" else now
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(field, value, repr(stored))
                pipe.publish(f"{self.ns}:revocations",
                             orjson.dumps({"kind": kind, "value": value, "at": stored}))
                pipe.execute()
        except Exception as exc:
            raise Unavailable("revocations need Redis, which is unreachable", retry_after=2,
                              slug="redis-unavailable") from exc
        self._apply(kind, value, stored)
        return now

    def _message(self, data: bytes) -> None:
        doc = orjson.loads(data)
        self._apply(doc["kind"], doc["value"], float(doc["at"]))

    def _apply(self, kind: str, value: str, at: float) -> None:
        table = self.jtis if kind == "jti" else self.subjects
        if table.get(value) == at:
            return  # ours, announced back to us
        table[value] = at
        for listener in self.listeners:
            try:
                listener(kind, value, at)
            except Exception:
                log.exception("revocation listener failed")

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> None:
        """Replace the in-memory tables with what Redis holds, dropping expired entries."""
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(f"{self.ns}:revoked-jti")
            pipe.hgetall(f"{self.ns}:revoked-sub")
            jtis, subjects = pipe.execute()
        self.jtis = {k.decode(): float(v) for k, v in jtis.items() if float(v) > now}
        self.subjects = {k.decode(): float(v) for k, v in subjects.items()
                         if float(v) + self.keep_s > now}
        stale_jti = [k for k, v in jtis.items() if float(v) <= now]
        stale_sub = [k for k, v in subjects.items() if float(v) + self.keep_s <= now]
        if stale_jti or stale_sub:
            with self.redis.pipeline(transaction=False) as pipe:
                if stale_jti:
                    pipe.hdel(f"{self.ns}:revoked-jti", *stale_jti)
                if stale_sub:
                    pipe.hdel(f"{self.ns}:revoked-sub", *stale_sub)
                pipe.execute()

    def _reload_quietly(self) -> None:
        try:
            self.load()  # announcements may have been missed while the subscription was down
        except Exception:  # noqa: BLE001 - the next round tries again
            pass

    def _reload_forever(self) -> None:
        while True:
            gevent.sleep(self.reload_s)
            self._reload_quietly()
