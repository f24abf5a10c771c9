"""Pending events across the fleet: every process mirrors the requests its batcher holds
(accepted, not yet committed) into Redis, so a history read on any process includes them.

Each process owns one Redis hash, `<ns>:pending:<process id>`, field = the request's sequence
number, value = `{"c": client, "e": [[stream, type, data, key], ...]}`, and a score in the
sorted set `<ns>:pending-procs` saying until when it is alive. One greenlet per process keeps
the hash in step with the batcher: it wakes when the batcher's pending set changes, waits
`coalesce_s` (5 ms) so a burst costs one write (and a request that commits meanwhile costs
none), and sends the additions and removals in one pipeline (HSET, HDEL, and the lease: PEXPIRE
and ZADD). The hash lives for `ttl_s` past the last write, and
the greenlet touches it every `refresh_s`, so the entries of a process that dies disappear
within `ttl_s` (its unacknowledged events die with it; acknowledged ones are committed).

Without Redis the mirror stops writing (and resends everything once Redis is back), and reads
say that their pending part covers this process only.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import gevent
import orjson
from gevent.event import Event

from ingest.batcher import Batcher
from ingest.events import IngestRequest

log = logging.getLogger("sluice.pending")


@dataclass(frozen=True, slots=True)
class RemotePending:
    """An event another process accepted and has not committed yet."""

    client_id: str
    stream: str
    type: str
    data: str
    key: str | None
    order: tuple[str, int, int]  # (process, request sequence, index): acceptance order there


class PendingMirror:
    """Keeps this process's pending requests in Redis and reads the other processes'."""

    def __init__(
        self,
        redis: Any,
        batcher: Batcher,
        *,
        namespace: str,
        process_id: str | None = None,
        ttl_s: float = 5.0,
        refresh_s: float = 1.0,
        coalesce_s: float = 0.005,
    ) -> None:
        self.redis = redis
        self.batcher = batcher
        self.process_id = process_id or secrets.token_hex(6)
        self.key = f"{namespace}:pending:{self.process_id}"
        self.procs_key = f"{namespace}:pending-procs"
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self.coalesce_s = coalesce_s
        self.up = False  # the last write reached Redis
        self.writes = 0  # pipelines sent (for the benchmark and tests)
        self._written: dict[int, IngestRequest] = {}
        self._renewed = 0.0  # when the hash's lease was last extended
        self._changed = Event()
        self._greenlet: gevent.Greenlet | None = None
        batcher.on_change = self._changed.set

    def start(self) -> PendingMirror:
        self._greenlet = gevent.spawn(self._forever)
        return self

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.key)
                pipe.zrem(self.procs_key, self.process_id)
                pipe.execute()
        except Exception:  # noqa: BLE001 - its entries expire anyway
            pass

    # -- writing ------------------------------------------------------------------------------
    def _forever(self) -> None:
        while True:
            self._changed.wait(self.refresh_s)
            if self._changed.is_set() and self.coalesce_s:
                gevent.sleep(self.coalesce_s)  # let the rest of a burst arrive: one write
            self._changed.clear()
            try:
                self.sync()
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down: resend all when it is back
                if self.up:
                    log.warning("pending mirror: redis unreachable (%s)", exc)
                self.up = False
                self._written.clear()
                gevent.sleep(self.refresh_s)

    def sync(self) -> None:
        """Write what changed since the last sync (everything, after a failure)."""
        current = {req.seq: req for req in self.batcher.pending() if not req.cancelled}
        added = [req for seq, req in current.items() if seq not in self._written]
        removed = [seq for seq in self._written if seq not in current]
        now = time.monotonic()
        renew = not self.up or now - self._renewed >= self.refresh_s
        if not (added or removed or renew):
            return
        with self.redis.pipeline(transaction=False) as pipe:
            if not self.up:
                pipe.delete(self.key)
            if added:
                pipe.hset(
                    self.key,
                    mapping={
                        str(req.seq): orjson.dumps(
                            {"c": req.client_id, "e": [[e.stream, e.type, e.data, e.key] for e in req.events]}
                        )
                        for req in added
                    },
                )
            if removed:
                pipe.hdel(self.key, *[str(seq) for seq in removed])
            if renew or added:  # the lease: extended once a second, and whenever the hash is made
                pipe.pexpire(self.key, int(self.ttl_s * 1000))
                pipe.zadd(self.procs_key, {self.process_id: time.time() + self.ttl_s})
            pipe.execute()
        if renew or added:
            self._renewed = now
        self.writes += 1
        self.up = True
        self._written = current

    # -- reading ------------------------------------------------------------------------------
    def others(self, client_id: str | None, stream: str | None) -> list[RemotePending]:
        """Pending events of every other live process matching the filters, in each
        process's acceptance order. Raises if Redis cannot be read."""
        now = time.time()
        procs = [p.decode() for p in self.redis.zrangebyscore(self.procs_key, now, "+inf")]
        procs = [p for p in procs if p != self.process_id]
        if not procs:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for proc in procs:
                pipe.hgetall(f"{self.namespace}:pending:{proc}")
            hashes = pipe.execute()
        out: list[RemotePending] = []
        for proc, fields in zip(procs, hashes, strict=True):
            for seq, raw in fields.items():
                doc = orjson.loads(raw)
                if client_id is not None and doc["c"] != client_id:
                    continue
                for i, (s, t, d, k) in enumerate(doc["e"]):
                    if stream is None or s == stream:
                        out.append(RemotePending(doc["c"], s, t, d, k, (proc, int(seq), i)))
        out.sort(key=lambda e: e.order)
        return out
