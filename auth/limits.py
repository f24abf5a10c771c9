"""Per-credential and per-address connection limits for subscribers (SSE and long-poll), counted
across the fleet.

Each process counts the connections it holds, and with Redis it also keeps a lease per limited
key: the hash `<ns>:limit:<key>` has one field per process holding connections under that key
(its count), and the sorted set `<ns>:limit-procs` says until when each process is alive (every
process renews its entry every `refresh_s`). Admitting a connection is one Lua call that adds
up the fields of live processes, refuses at the limit and otherwise increments this process's
field, atomically, so N processes together allow the limit, not N times it. A process that dies
stops renewing, and its fields stop counting within `lease_s`. Without Redis, or while it is
unreachable, each process counts alone (the limit then holds per process), and the fields it
could not update are rewritten from its own counts once Redis answers again. A process's field
is always written as its own count (never incremented blindly), so a slot taken while Redis was
away is counted when it returns and given back when it closes, and a Redis that restarted empty
is made whole by the next admission, release or renewal.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import gevent

from common.problems import Problem

log = logging.getLogger("sluice.limits")

# KEYS[1] = the key's hash; ARGV = this process, the limit, this process's own count now (its
# field is rewritten from that, so a field a Redis restart lost is whole again), then the other
# processes to count.
ADMIT = """
local total = tonumber(ARGV[3])
for i = 4, #ARGV do
  if ARGV[i] ~= ARGV[1] then
    local v = redis.call('HGET', KEYS[1], ARGV[i])
    if v then total = total + tonumber(v) end
  end
end
if total >= tonumber(ARGV[2]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], tonumber(ARGV[3]) + 1)
redis.call('PEXPIRE', KEYS[1], 86400000)
return total + 1
"""


@functools.lru_cache(maxsize=4096)  # a poller sends the same token every few seconds
def token_key(token: str) -> str:
    """What MAX_CONNECTIONS_PER_TOKEN counts by: a digest, never the token itself."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]


class ConnectionLimits:
    """Counts held connections by credential key and by client address, in the fleet."""

    def __init__(
        self,
        per_token: int,
        per_ip: int,
        refused: Any = None,
        *,
        redis: Any = None,
        namespace: str = "sluice",
        process_id: str | None = None,
        lease_s: float = 10.0,
        refresh_s: float = 2.0,
    ) -> None:
        self.per_token = per_token
        self.per_ip = per_ip
        self.refused = refused  # a labelled Prometheus counter, or None
        self.by_token: dict[str, int] = {}
        self.by_ip: dict[str, int] = {}
        self.held: dict[str, int] = {"sse": 0, "poll": 0}  # by transport, for the metrics
        self.redis = redis if (per_token or per_ip) else None  # no limit: nothing to share
        self.ns = namespace
        self.process_id = process_id or secrets.token_hex(6)
        self.lease_s = lease_s
        self.refresh_s = refresh_s
        self.fleet = False  # the last Redis call worked: limits count the fleet
        self._dirty: set[str] = set()  # Redis fields to rewrite from the local counts
        self._admit: Any = None
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> ConnectionLimits:
        if self.redis is not None:
            self._admit = self.redis.register_script(ADMIT)
            self._renew()
            self._greenlet = gevent.spawn(self._renew_forever)
        return self

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        if self.redis is not None:
            try:
                self.redis.zrem(f"{self.ns}:limit-procs", self.process_id)
            except Exception:  # noqa: BLE001 - its lease runs out anyway
                pass

    def acquire(self, token_key: str, address: str | None, transport: str = "sse") -> Callable[[], None]:
        """Count one connection, or raise 429 if it would pass a limit. Returns the release
        function (safe to call more than once)."""
        address = address or "-"
        checks = []
        if self.per_token:
            checks.append(
                (
                    "token",
                    "t:" + token_key,
                    self.by_token,
                    token_key,
                    self.per_token,
                    f"this token already holds {self.per_token} connections",
                )
            )
        if self.per_ip:
            checks.append(
                (
                    "ip",
                    "i:" + address,
                    self.by_ip,
                    address,
                    self.per_ip,
                    f"this address already holds {self.per_ip} connections",
                )
            )
        taken: list[tuple[str, dict[str, int], str, bool]] = []
        try:
            for which, lease, counts, key, limit, detail in checks:
                shared = self._admit_fleet(lease, limit, counts.get(key, 0))
                if shared is None and counts.get(key, 0) >= limit:  # Redis down: count alone
                    shared = False
                if shared is False:
                    self._refuse(which, detail, limit)
                counts[key] = counts.get(key, 0) + 1
                taken.append((lease, counts, key, shared is True))
        except Problem:
            for lease, counts, key, in_redis in taken:
                self._give_back(lease, counts, key, in_redis)
            raise
        self.held[transport] = self.held.get(transport, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.held[transport] -= 1
            for lease, counts, key, in_redis in taken:
                self._give_back(lease, counts, key, in_redis)

        return release

    # -- Redis ----------------------------------------------------------------------------------
    def _admit_fleet(self, lease: str, limit: int, own: int) -> bool | None:
        """True: admitted and counted in Redis; False: the fleet is at the limit; None: Redis
        is unreachable (count locally)."""
        if self._admit is None:
            return None
        try:
            live = self._live()
            answer = self._admit(keys=[f"{self.ns}:limit:{lease}"], args=[self.process_id, limit, own, *live])
        except Exception as exc:  # noqa: BLE001 - fall back to counting in this process
            if self.fleet:
                log.warning("connection limits: redis unreachable (%s); counting per process", exc)
            self.fleet = False
            self._dirty.add(lease)
            return None
        self.fleet = True
        return int(answer) >= 0

    def _live(self) -> list[str]:
        assert self.redis is not None
        live = [p.decode() for p in self.redis.zrangebyscore(f"{self.ns}:limit-procs", time.time(), "+inf")]
        return live if self.process_id in live else [*live, self.process_id]

    def _give_back(self, lease: str, counts: dict[str, int], key: str, in_redis: bool) -> None:
        """One slot back: this process's field becomes its count (taken in Redis or not: a
        slot taken while Redis was away was written there by the renewal since)."""
        _decrement(counts, key)
        if self.redis is None:
            return
        try:
            self._write_count(self.redis, lease, counts.get(key, 0))
        except Exception:  # noqa: BLE001 - rewritten from the local count later
            self._dirty.add(lease)

    def _write_count(self, target: Any, lease: str, count: int) -> None:
        if count > 0:
            target.hset(f"{self.ns}:limit:{lease}", self.process_id, count)
        else:
            target.hdel(f"{self.ns}:limit:{lease}", self.process_id)

    def _renew_forever(self) -> None:
        while True:
            gevent.sleep(self.refresh_s)
            try:
                self._renew()
            except Exception:  # noqa: BLE001 - Redis down: try again next time
                self.fleet = False

    def _renew(self) -> None:
        """Keep this process's lease alive, and rewrite fields a failed call left wrong."""
        if self.redis is None:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(f"{self.ns}:limit-procs", {self.process_id: time.time() + self.lease_s})
            pipe.zremrangebyscore(f"{self.ns}:limit-procs", "-inf", time.time() - 3600)
            dirty, self._dirty = self._dirty, set()
            for lease in dirty:
                kind, _, key = lease.partition(":")
                self._write_count(pipe, lease, (self.by_token if kind == "t" else self.by_ip).get(key, 0))
            try:
                pipe.execute()
            except Exception:
                self._dirty |= dirty
                raise
        self.fleet = True

    def _refuse(self, which: str, detail: str, limit: int) -> None:
        if self.refused is not None:
            self.refused.labels(which).inc()
        raise Problem(
            429,
            "too-many-connections",
            detail + "; close one first",
            headers={"Retry-After": "10"},
            limit=limit,
        )


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
