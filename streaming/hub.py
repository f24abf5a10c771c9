"""The hub: one per process. It learns of every commit, in position order, and hands each event
to the local subscribers of its stream without ever waiting on one of them.

How commits reach it: after each batch commits, the batcher calls `on_commit`, which publishes
ONE Redis message for the whole batch on one channel; every process's hub holds ONE Redis
subscription and receives every batch, its own included. A message carries the batch's reserved
position range (after, upto]; ranges are contiguous across all processes, so the hub delivers
strictly in position order: a message that arrives ahead of its predecessor is held, and if the
hole is not filled within `gap_wait_s` (a lost message, a Redis outage) the hub reads the missing
range from Postgres. Because commit order equals id order, once any later commit is visible,
everything below it is committed, so that read is complete.

Without Redis, local commits go straight to the ordering path, and a poller reads commits made
by other processes from Postgres every `poll_s`, so delivery continues.

Fan-out is `put_nowait` into each subscriber's bounded queue, one item per delivery holding the
events of one commit that the subscriber wants (so a large batch costs one slot, not one per
event); each event's framing body is encoded once (only the per-connection `id:` line is added
per subscriber). A subscriber whose writer is idle on an empty queue offers a `sink` instead: the
hub hands it the delivery, which it writes with one non-blocking send (see streaming/direct.py). A subscriber whose queue is full is marked overflowed and dropped from the hub:
its connection then ends with a `retry:` hint and the client resumes from its last id.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import gevent
import orjson
from gevent.event import Event
from gevent.queue import Full, Queue

from ingest.events import Commit, StoredEvent
from ingest.pool import Pool
from ingest.store import EventStore
from streaming.sse import EventStreamFraming, Framing

log = logging.getLogger("sluice.hub")

CHANNEL = "sluice:commits"       # default Redis channel: one message per committed batch
FILL_PAGE = 2000                 # rows per Postgres read when filling a hole


@dataclass(slots=True)
class LiveEvent:
    """A committed event on its way to subscribers; `body` is shared by all of them."""

    position: int
    stream: str
    type: str
    data: str
    body: bytes
    _envelope: bytes | None = None

    def envelope(self) -> bytes:
        """The body for `?envelope=1` subscribers (a `message` whose data carries the type),
        built once per event for all of them."""
        if self._envelope is None:
            self._envelope = envelope_body(self.type, self.data)
        return self._envelope


def envelope_body(event_type: str, data: str) -> bytes:
    """`event: message` with `{"type": ..., "data": ...}`: EventSource hands every type to one
    `message` listener. Types match ^[A-Za-z0-9._:-]{1,64}$: nothing to escape."""
    return b'event: message\ndata: {"type":"%s","data":%s}\n\n' % (event_type.encode(),
                                                                     data.encode())


@dataclass(frozen=True)
class StreamEnded:
    """Queued instead of a delivery when one of the subscription's streams was deleted."""

    stream: str


HEARTBEAT = "heartbeat"  # queued by the hub's ticker when a subscriber has been quiet


@dataclass(eq=False, slots=True)
class Subscription:
    """One subscriber: its streams, decided once, and its bounded queue of deliveries.

    Its writer stamps `active_at` after each write and `writing_since` while a write is in
    progress, so the hub's one ticker can send heartbeats and end stuck writes for everyone,
    instead of a timer per subscriber per wait.
    """

    streams: frozenset[str]
    queue: Queue
    overflowed: bool = False
    closed: bool = False
    active_at: float = field(default_factory=time.monotonic)
    writing_since: float = 0.0
    on_stuck: Callable[[], None] | None = None
    last: int = 0                       # the last position this subscriber was sent
    envelope: bool = False              # `?envelope=1`: every event as a typed message
    # Set by the writer only while it waits on an empty queue: the hub then hands deliveries to
    # it directly (it must not wait; it queues what it could not write, and unsets itself).
    sink: Callable[[list["LiveEvent"]], None] | None = None

    def close(self) -> None:
        """End the subscription; wakes its reader (a full queue is drained first, then noticed)."""
        self.closed = True
        try:
            self.queue.put_nowait(None)
        except Full:
            pass

    def offer(self, events: list[LiveEvent]) -> bool:
        """Enqueue one delivery without waiting; False (and overflowed) if the queue is full."""
        try:
            self.queue.put_nowait(events)
            return True
        except Full:
            self.overflowed = True
            self.closed = True
            return False


class Hub:
    """Orders committed events by position and fans them out to local subscribers."""

    def __init__(self, store: EventStore, pool: Pool, redis: Any, *,
                 channel: str = CHANNEL, framing: Framing | None = None,
                 gap_wait_s: float = 0.25, poll_s: float = 0.25,
                 redis_retry_s: float = 1.0, overflow_counter: Any = None,
                 heartbeat_s: float = 15.0, write_timeout_s: float = 30.0,
                 stream_cache_s: float = 10.0) -> None:
        self.store = store
        self.pool = pool
        self.redis = redis
        self.channel = channel
        self.framing = framing or EventStreamFraming()
        self.gap_wait_s = gap_wait_s
        self.poll_s = poll_s
        self.redis_retry_s = redis_retry_s
        self.position = 0                   # every event with id <= position was delivered
        self.redis_up = False
        self.overflows = 0                  # subscribers cut loose because their queue filled
        self.delivered = 0                  # events handed to subscribers (one per connection)
        self.overflow_counter = overflow_counter  # e.g. a Prometheus Counter
        self.heartbeat_s = heartbeat_s
        self.write_timeout_s = write_timeout_s
        self._held: dict[int, tuple[int, list]] = {}   # after -> (upto, events) ahead of a hole
        self._by_stream: dict[str, set[Subscription]] = {}
        self._subs: set[Subscription] = set()
        self.stream_cache_s = stream_cache_s
        self._known: dict[str, float] = {}  # stream -> until when it is trusted to exist
        self._wake_filler = Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._subscribed = Event()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "Hub":
        """Subscribe to Redis first, then read the current position: nothing falls between."""
        self._greenlets.append(gevent.spawn(self._listen))
        self._subscribed.wait(timeout=5)
        with self.pool.connection() as conn:
            self.position = max(self.position, self.store.last_position(conn))
        self._greenlets.append(gevent.spawn(self._fill_holes))
        self._greenlets.append(gevent.spawn(self._tick))
        return self

    def stop(self) -> None:
        gevent.killall(self._greenlets, block=False)
        for sub in list(self._subs):
            sub.close()

    # -- subscribers --------------------------------------------------------------------------
    def subscribe(self, streams: Iterable[str], maxsize: int) -> tuple[Subscription, int]:
        """Register a subscriber; returns it and the position live delivery starts after.

        Everything with id <= that position must come from the store (catch-up); everything
        after it arrives in the queue, in order. No yield happens between the two.
        """
        sub = Subscription(frozenset(streams), Queue(maxsize))
        for stream in sub.streams:
            self._by_stream.setdefault(stream, set()).add(sub)
        self._subs.add(sub)
        return sub, self.position

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        for stream in sub.streams:
            subs = self._by_stream.get(stream)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_stream[stream]
        sub.close()

    def subscriber_count(self, stream: str | None = None) -> int:
        if stream is not None:
            return len(self._by_stream.get(stream, ()))
        return len(self._subs)

    def missing_streams(self, streams: Iterable[str]) -> set[str]:
        """The streams that do not exist. A stream seen to exist is trusted for
        `stream_cache_s`, so a reconnect storm does not queue on the pool; deleting a stream
        forgets it at once in every process (the hub's `end` message)."""
        now = time.monotonic()
        ask = [s for s in streams if self._known.get(s, 0.0) <= now]
        if not ask:
            return set()
        with self.pool.connection() as conn:
            found = self.store.existing_streams(conn, ask)
        if len(self._known) > 100_000:  # bounded: start again rather than grow
            self._known.clear()
        until = now + self.stream_cache_s
        for stream in found:
            self._known[stream] = until
        return set(ask) - found

    def _tick(self) -> None:
        """Heartbeats for quiet subscribers; ends writes stuck past `write_timeout_s`."""
        interval = min(self.heartbeat_s, self.write_timeout_s) / 2
        while True:
            gevent.sleep(interval)
            now = time.monotonic()
            for sub in list(self._subs):
                if sub.writing_since and now - sub.writing_since > self.write_timeout_s:
                    if sub.on_stuck is not None:
                        sub.on_stuck()
                    self.unsubscribe(sub)
                elif not sub.writing_since and now - sub.active_at >= self.heartbeat_s \
                        and sub.queue.empty():
                    sub.active_at = now
                    try:
                        sub.queue.put_nowait(HEARTBEAT)
                    except Full:
                        pass

    # -- commits in -----------------------------------------------------------------------------
    def on_commit(self, commit: Commit) -> None:
        """Batcher listener: publish the batch once to every process (this one included)."""
        events = [[w.id, w.stream, ev.type, ev.data]
                  for req in commit.requests
                  for ev, w in zip(req.events, req.results or ()) if not w.duplicate]
        message = orjson.dumps({"a": commit.after, "u": commit.upto, "e": events})
        if self.redis_up:
            try:
                self.redis.publish(self.channel, message)
                return
            except Exception:  # noqa: BLE001 - fall back to local delivery below
                log.warning("redis publish failed; delivering locally")
                self.redis_up = False
        self._receive(commit.after, commit.upto, events)

    def end_stream(self, stream: str) -> None:
        """A stream was deleted: tell its subscribers in every process."""
        self._known.pop(stream, None)
        if self.redis_up:
            try:
                self.redis.publish(self.channel, orjson.dumps({"end": stream}))
                return
            except Exception:  # noqa: BLE001 - fall back to this process's subscribers
                self.redis_up = False
        self._end(stream)

    def _end(self, stream: str) -> None:
        self._known.pop(stream, None)
        for sub in list(self._by_stream.get(stream, ())):
            try:
                sub.queue.put_nowait(StreamEnded(stream))
            except Full:
                pass  # it is being cut loose anyway; its reconnect will get 404
            self.unsubscribe(sub)

    def _listen(self) -> None:
        """The process's one Redis subscription; reconnects after failures."""
        while True:
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self.redis_up = True
                self._subscribed.set()
                self._wake_filler.set()  # messages may have been lost while down: check
                for message in pubsub.listen():
                    if message.get("type") == "message":
                        doc = orjson.loads(message["data"])
                        if "end" in doc:
                            self._end(doc["end"])
                        else:
                            self._receive(doc["a"], doc["u"], doc["e"])
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down: poll Postgres meanwhile
                if self.redis_up:
                    log.warning("redis subscription lost (%s); polling Postgres", exc)
                self.redis_up = False
                self._subscribed.set()
                self._wake_filler.set()
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass
            gevent.sleep(self.redis_retry_s)

    # -- ordering -----------------------------------------------------------------------------
    def _receive(self, after: int, upto: int, events: list) -> None:
        if upto <= self.position:
            return  # already delivered (our own message after a local fallback, or a re-read)
        if after > self.position:
            self._held[after] = (upto, events)
            self._wake_filler.set()
            return
        self._advance(events, upto)
        self._release_held()

    def _advance(self, events: list, upto: int) -> None:
        """Deliver what lies beyond the position, then move it. Filtering by position makes a
        fill from Postgres and a late Redis message safe to overlap: nothing goes out twice."""
        self._deliver([e for e in events if e[0] > self.position])
        self.position = max(self.position, upto)

    def _release_held(self) -> None:
        while self._held:
            earliest = min(self._held)
            if earliest > self.position:
                return
            upto, events = self._held.pop(earliest)
            self._advance(events, upto)

    def _fill_holes(self) -> None:
        """Fill holes from Postgres: after `gap_wait_s` for a held message, or every `poll_s`
        while Redis is down."""
        while True:
            self._wake_filler.wait(timeout=None if self.redis_up else self.poll_s)
            self._wake_filler.clear()
            try:
                if self._held:
                    gevent.sleep(self.gap_wait_s)
                    if self._held and min(self._held) > self.position:
                        self._fill_from_store(upto=min(self._held))
                        self._release_held()
                elif not self.redis_up:
                    with self.pool.connection() as conn:
                        latest = self.store.last_position(conn)
                    if latest > self.position:
                        self._fill_from_store(upto=latest)
            except Exception as exc:  # noqa: BLE001 - database down: try again shortly
                log.warning("hub could not read missing events: %s", exc)
                gevent.sleep(self.poll_s)
                self._wake_filler.set()

    def _fill_from_store(self, upto: int) -> None:
        while self.position < upto:
            with self.pool.connection() as conn:
                rows: list[StoredEvent] = self.store.read_events(
                    conn, after=self.position, upto=upto, limit=FILL_PAGE)
            self._advance([[r.id, r.stream, r.type, r.data] for r in rows],
                          rows[-1].id if len(rows) == FILL_PAGE else upto)

    # -- fan-out ------------------------------------------------------------------------------
    def _deliver(self, events: list) -> None:
        """One queue item per subscriber per delivery. Events are grouped by stream once; a
        subscriber of a single stream gets that shared list as is (one put per subscriber)."""
        by_stream: dict[str, list[LiveEvent]] = {}
        for position, stream, event_type, data in events:
            if stream in self._by_stream:
                by_stream.setdefault(stream, []).append(
                    LiveEvent(position, stream, event_type, data,
                              self.framing.body(event_type, data)))
        merged: dict[Subscription, list[LiveEvent]] = {}
        for stream, lives in by_stream.items():
            for sub in list(self._by_stream.get(stream, ())):
                if len(sub.streams) == 1:
                    self._offer(sub, lives)
                else:
                    merged.setdefault(sub, []).extend(lives)
        for sub, lives in merged.items():
            lives.sort(key=lambda e: e.position)
            self._offer(sub, lives)

    def _offer(self, sub: Subscription, lives: list[LiveEvent]) -> None:
        self.delivered += len(lives)
        sink = sub.sink
        if sink is not None:
            sink(lives)  # the writer is idle with nothing queued: write now, without waiting
            return
        if not sub.offer(lives):
            self.overflows += 1
            if self.overflow_counter is not None:
                self.overflow_counter.inc()
            self.unsubscribe(sub)
