"""Who is listening, across every process: subscriber counts, one connection per connection id,
and subscribe/unsubscribe notices for the origin.

- **Counts.** Each process keeps its subscribers per stream (the hub already does) and writes
  the counts of streams that changed to a Redis hash per stream every second, one field per
  process, next to a heartbeat key for the process. A count is the sum over processes whose
  heartbeat is alive, so a killed process stops counting within seconds.
- **One connection per `sid`.** An SSE connection that arrives with a connection id closes any
  older connection with that id, in this process at once and in the others through a Redis
  message: the newer wins (the older gets its final `retry:`).
- **Notices** (`SLUICE_WEBHOOK_URL`, see streaming/webhooks.py). Whether a connection is new or a
  reconnect is decided in Redis, per sid and stream, so it holds whichever process the client
  lands on: joining increments a counter and deletes a "leaving" marker. A join that found the
  marker is a reconnect within the grace period (no notice); a first join is a `subscribe`. The
  last leave sets the marker; if it is still there after `WEBHOOK_GRACE_S`, nobody came back and
  the leave is an `unsubscribe`. The check is queued in Redis (a sorted set by due time) and
  claimed by whichever live process gets to it first, so it survives a restart. Streaming never
  waits on any of this beyond one pipelined Redis round trip at connect and disconnect.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any

import gevent
import orjson

from common.pubsub import subscribe_forever
from streaming.hub import Hub
from streaming.subscription import Subscription, bound_sid

FLUSH_S = 1.0
HEARTBEAT_TTL_S = 10
CONN_TTL_S = 86400


class Presence:
    def __init__(
        self, redis: Any, hub: Hub, *, namespace: str, notifier: Any = None, grace_s: float = 5.0
    ) -> None:
        self.redis = redis
        self.hub = hub
        self.ns = namespace  # e.g. "sluice:<database identity>"
        self.process_id = secrets.token_hex(6)
        self.notifier = notifier  # a WebhookNotifier, or None
        self.grace_s = grace_s
        self._dirty: set[str] = set()
        self._by_sid: dict[str, list[tuple[Subscription, float]]] = {}
        self._greenlets: list[gevent.Greenlet] = []
        self.stats: Any = None  # a callable giving this process's dashboard numbers, or None

    def start(self) -> Presence:
        self._greenlets = [gevent.spawn(self._flush_forever), gevent.spawn(self._listen)]
        return self

    def stop(self) -> None:
        gevent.killall(self._greenlets, block=False)
        try:
            self.redis.delete(self._heartbeat_key(self.process_id))
        except Exception:  # noqa: BLE001 - the heartbeat expires by itself
            pass

    # -- connections --------------------------------------------------------------------------
    def join(self, sub: Subscription, sid: str, subject: str, *, takeover: bool) -> None:
        """A subscriber connected. With `takeover`, older connections with its sid are closed."""
        self._dirty.update(sub.streams)
        if takeover:  # keyed by the sid within its subject: another subject's cannot take over
            key, now = bound_sid(subject, sid), time.time()
            for older, _ in self._by_sid.get(key, ()):
                older.close()
            self._by_sid[key] = [(sub, now)]
            self._publish_takeover(key, now)
        if self.notifier is not None:
            self._joined(sid, subject, sub.streams)

    def leave(self, sub: Subscription, sid: str, subject: str, *, takeover: bool) -> None:
        self._dirty.update(sub.streams)
        if takeover:
            key = bound_sid(subject, sid)
            held = [(s, t) for s, t in self._by_sid.get(key, ()) if s is not sub]
            if held:
                self._by_sid[key] = held
            else:
                self._by_sid.pop(key, None)
        if self.notifier is not None:
            self._left(sid, subject, sub.streams)

    def count(self, stream: str) -> int:
        """Live subscribers of `stream` in every process (this one's own count if Redis fails)."""
        try:
            fields = self.redis.hgetall(self._count_key(stream))
            fields.pop(self.process_id.encode(), None)
            alive = self.redis.mget([self._heartbeat_key(p.decode()) for p in fields]) if fields else []
        except Exception:  # noqa: BLE001
            return self.hub.subscriber_count(stream)
        others = sum(int(v) for (_, v), up in zip(fields.items(), alive, strict=False) if up)
        return self.hub.subscriber_count(stream) + others

    def snapshots(self) -> list[dict]:
        """The dashboard numbers the other live processes wrote in the last second or so."""
        try:
            fields = self.redis.hgetall(f"{self.ns}:stats")
            fields.pop(self.process_id.encode(), None)
            if not fields:
                return []
            alive = self.redis.mget([self._heartbeat_key(p.decode()) for p in fields])
        except Exception:  # noqa: BLE001
            return []
        return [orjson.loads(v) for v, up in zip(fields.values(), alive, strict=False) if up]

    # -- counts -------------------------------------------------------------------------------
    def _count_key(self, stream: str) -> str:
        return f"{self.ns}:subscribers:{stream}"

    def _heartbeat_key(self, process_id: str) -> str:
        return f"{self.ns}:process:{process_id}"

    def _flush_forever(self) -> None:
        while True:
            try:
                self._flush()
                self._due_leaves()
            except Exception:  # noqa: BLE001 - Redis down: try again next round
                pass
            gevent.sleep(FLUSH_S)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self._heartbeat_key(self.process_id), 1, ex=HEARTBEAT_TTL_S)
                if self.stats is not None:
                    pipe.hset(f"{self.ns}:stats", self.process_id, orjson.dumps(self.stats()))
                    pipe.expire(f"{self.ns}:stats", CONN_TTL_S)
                for stream in dirty:
                    n = self.hub.subscriber_count(stream)
                    if n:
                        pipe.hset(self._count_key(stream), self.process_id, n)
                        pipe.expire(self._count_key(stream), CONN_TTL_S)
                    else:
                        pipe.hdel(self._count_key(stream), self.process_id)
                pipe.execute()
        except Exception:
            self._dirty |= dirty  # write them next time
            raise

    # -- one connection per sid ---------------------------------------------------------------
    def _publish_takeover(self, sid: str, at: float) -> None:
        try:
            self.redis.publish(f"{self.ns}:takeover", f"{self.process_id} {sid} {at!r}")
        except Exception:  # noqa: BLE001 - other processes find out when the old one ends
            pass

    def _listen(self) -> None:
        subscribe_forever(self.redis, f"{self.ns}:takeover", self._takeover)

    def _takeover(self, data: bytes) -> None:
        process_id, sid, at = data.decode().split(" ")
        if process_id == self.process_id:
            return
        for older, opened in self._by_sid.get(sid, ()):
            if opened < float(at):
                older.close()  # the newer connection, elsewhere, wins

    # -- notices ------------------------------------------------------------------------------
    def _conn_key(self, sid: str, stream: str) -> str:
        return f"{self.ns}:conn:{sid}:{stream}"

    def _leaving_key(self, sid: str, stream: str) -> str:
        return f"{self.ns}:leaving:{sid}:{stream}"

    def _joined(self, sid: str, subject: str, streams: Iterable[str]) -> None:
        streams = sorted(streams)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.incr(self._conn_key(sid, stream))
                    pipe.expire(self._conn_key(sid, stream), CONN_TTL_S)
                    pipe.delete(self._leaving_key(sid, stream))
                results = pipe.execute()
        except Exception:  # noqa: BLE001 - without Redis there is no cross-process answer
            return
        for i, stream in enumerate(streams):
            held, _, was_leaving = results[3 * i : 3 * i + 3]
            if int(held) == 1 and not was_leaving:
                self.notifier.notify("subscribe", stream, subject, sid)

    def _left(self, sid: str, subject: str, streams: Iterable[str]) -> None:
        streams = sorted(streams)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.decr(self._conn_key(sid, stream))
                held = pipe.execute()
            gone = [s for s, n in zip(streams, held, strict=False) if int(n) <= 0]
            if not gone:
                return
            due = time.time() + self.grace_s
            with self.redis.pipeline(transaction=False) as pipe:
                for stream in gone:
                    pipe.delete(self._conn_key(sid, stream))
                    pipe.set(self._leaving_key(sid, stream), 1, px=int((self.grace_s * 4 + 30) * 1000))
                    # The grace check is shared: whichever live process looks first after `due`
                    # does it, so a departure is reported even if this process stops meanwhile.
                    pipe.zadd(f"{self.ns}:leaving-due", {orjson.dumps([sid, subject, stream]): due})
                pipe.execute()
        except Exception:  # noqa: BLE001
            return

    def _due_leaves(self) -> None:
        if self.notifier is None:
            return
        key = f"{self.ns}:leaving-due"
        members = self.redis.zrangebyscore(key, "-inf", time.time(), start=0, num=500)
        for member in members:
            if not self.redis.zrem(key, member):
                continue  # another process claimed it
            sid, subject, stream = orjson.loads(member)
            if self.redis.delete(self._leaving_key(sid, stream)):
                self.notifier.notify("unsubscribe", stream, subject, sid)  # nobody came back
