"""The hub: one per process. It learns of every commit (through `streaming.relay`), puts them in
position order, and hands each event to the local subscribers of its stream without ever
waiting on one of them.

Ordering: a commit message carries its batch's reserved position range (after, upto]; ranges are
contiguous across all processes, so the hub delivers strictly in position order. A message that
arrives ahead of its predecessor is held, and if the hole is not filled within `gap_wait_s` (a
lost message, a Redis outage) the hub reads the missing range from Postgres. Because commit
order equals id order, once any later commit is visible everything below it is committed, so
that read is complete. While Redis is down the hub polls Postgres every `poll_s`.

Fan-out runs in the hub's own deliverer greenlet, apart from what receives commits: ordered
commits wait in a bounded outbox, and each pass of the deliverer takes every commit waiting
(whole commits, up to `MERGE_EVENTS` events) as ONE delivery. Under light load a pass carries
one commit, as before. When commits arrive faster than a pass takes (a busy publisher, many
subscribers), a subscriber gets them in one write instead of one write each; the write is most
of what a delivery costs (the kernel's loopback send, ~8 µs). A pass yields to the event loop
every `FANOUT_SLICE` subscribers, so a large fan-out does not stall requests, and the next
commits are written to Postgres while it runs. When the outbox is full (`OUTBOX_EVENTS`),
whatever hands the hub commits waits: the Redis listener, the hole filler, and this process's
batcher (its own commits come straight from it, see streaming.relay), whose next batch then
waits too.

A delivery is `put_nowait` into each subscriber's bounded queue, one item holding the events
that the subscriber wants (a large batch costs one slot, not one per event); each event's
framing body is encoded once (only the per-connection `id:` line is added per subscriber). An
idle parked connection offers a `sink` instead: the hub hands it the delivery, which it writes
with one non-blocking send (streaming/direct.py).
A subscriber whose queue is full is marked overflowed and dropped from the hub: its connection
then ends with a `retry:` hint and the client resumes from its last id.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gevent.event import Event
from gevent.queue import Full

from auth.grants import PatternIndex
from common.cache import BoundedCache
from ingest.events import Commit
from ingest.pool import Pool
from ingest.store import EventStore
from streaming.activity import StreamActivity
from streaming.relay import CHANNEL, Events, Relay
from streaming.sse import EventStreamFraming, Framing
from streaming.subscription import HEARTBEAT, LiveEvent, Mailbox, StreamEnded, Subscription

log = logging.getLogger("sluice.hub")

FANOUT_SLICE = 64  # subscribers written between two yields to the event loop
MERGE_EVENTS = 1000  # events of waiting commits merged into one pass (whole commits)
OUTBOX_EVENTS = 50_000  # ordered events waiting for the deliverer before receivers wait


def breathe() -> None:
    """Yield until the event loop has polled its sockets once, without a wait if none is
    ready: a zero timer. (`gevent.sleep(0)` may resume before the loop polls; any positive
    sleep waits at least a millisecond, epoll's resolution.)"""
    hub = gevent.get_hub()
    hub.wait(hub.loop.timer(0))


class Hub:
    """Orders committed events by position and fans them out to local subscribers."""

    def __init__(
        self,
        store: EventStore,
        pool: Pool,
        redis: Any,
        *,
        channel: str = CHANNEL,
        framing: Framing | None = None,
        gap_wait_s: float = 0.25,
        poll_s: float = 0.25,
        redis_retry_s: float = 1.0,
        overflow_counter: Any = None,
        heartbeat_s: float = 15.0,
        write_timeout_s: float = 30.0,
        stream_cache_s: float = 10.0,
    ) -> None:
        self.store = store
        self.pool = pool
        self.relay = Relay(store, pool, redis, channel=channel, retry_s=redis_retry_s)
        self.relay.receive = self._receive
        self.relay.end = self._end
        self.relay.changed = self._wake
        self.framing = framing or EventStreamFraming()
        self.gap_wait_s = gap_wait_s
        self.poll_s = poll_s
        self.position = 0  # every event with id <= position was handed to the deliverer
        self.overflows = 0  # subscribers cut loose because their queue filled
        self.delivered = 0  # events handed to subscribers (one per connection)
        self.overflow_counter = overflow_counter  # e.g. a Prometheus Counter
        self.heartbeat_s = heartbeat_s
        self.write_timeout_s = write_timeout_s
        self.stream_cache_s = stream_cache_s
        self._held: dict[int, tuple[int, Events]] = {}  # after -> (upto, events) past a hole
        self._by_stream: dict[str, set[Subscription]] = {}
        self._by_pattern: dict[str, set[Subscription]] = {}
        self._patterns = PatternIndex()  # stream -> matching live patterns, cached
        self._subs: set[Subscription] = set()
        # (jti, subject, iat) -> may a subscription so admitted stay? (the revocations')
        self.admits: Callable[[str | None, str, float | None], bool] | None = None
        self._taps: dict[str, Callable[[list[LiveEvent]], None]] = {}
        self.activity = StreamActivity()  # every stream's events in the fleet (dashboard)
        self._known: BoundedCache[str, bool] = BoundedCache(100_000)  # trusted to exist
        self._wake_filler = Event()
        self._expiry: list[tuple[float, int, Subscription]] = []  # (expires_at, order, sub)
        self._order = itertools.count()
        self._greenlets: list[gevent.Greenlet] = []
        self._outbox: deque[Events] = deque()  # ordered commits' fresh events, not yet delivered
        self._outbox_events = 0
        self._outbox_ready = Event()
        self._outbox_room = Event()
        self._outbox_room.set()
        self._deliverer: gevent.Greenlet | None = None

    @property
    def redis_up(self) -> bool:
        return self.relay.up

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Hub:
        """Subscribe to Redis first, then read the current position: nothing falls between."""
        self._deliverer = gevent.spawn(self._deliver_forever)
        self._greenlets.append(self._deliverer)
        self._greenlets.append(gevent.spawn(self.relay.listen))
        self.relay.subscribed.wait(timeout=5)
        self.position = max(self.position, self.relay.last_position())
        self._greenlets.append(gevent.spawn(self._fill_holes))
        self._greenlets.append(gevent.spawn(self._tick))
        return self

    def stop(self, wait_s: float = 0.0) -> None:
        """Stop, and close every subscription: each stream writes its `retry:` and ends. Waits up
        to `wait_s` for them to finish (a parked stream's writer runs in a greenlet of its own,
        which no server waits for)."""
        gevent.killall(self._greenlets, block=False)
        for sub in list(self._subs):
            sub.close()
        deadline = time.monotonic() + wait_s
        while self._subs and time.monotonic() < deadline:
            gevent.sleep(0.01)

    # -- subscribers --------------------------------------------------------------------------
    def subscribe(
        self,
        streams: Iterable[str],
        maxsize: int,
        *,
        expires_at: float = 0.0,
        jti: str | None = None,
        subject: str = "",
        issued_at: float | None = None,
        patterns: Iterable[str] = (),
        admits: Callable[[str], bool] | None = None,
    ) -> tuple[Subscription, int]:
        """Register a subscriber; returns it and the position live delivery starts after.

        Everything with id <= that position must come from the store (catch-up); everything
        after it arrives in the queue, in order. No yield happens between the two. The
        subscription ends when its credential expires (`expires_at`, unix time) or is revoked.
        """
        sub = Subscription(
            frozenset(streams),
            Mailbox(maxsize),
            frozenset(patterns),
            expires_at=expires_at,
            jti=jti,
            subject=subject,
            issued_at=issued_at,
            admits=admits,
        )
        return sub, self.add(sub)

    def add(self, sub: Subscription) -> int:
        """Register a subscription built elsewhere (another door's kind); returns the position
        live delivery starts after, as `subscribe` does."""
        for stream in sub.streams:
            self._by_stream.setdefault(stream, set()).add(sub)
        for pattern in sub.patterns:
            self._by_pattern.setdefault(pattern, set()).add(sub)
            self._patterns.add(pattern)
        self._subs.add(sub)
        if sub.expires_at:
            heapq.heappush(self._expiry, (sub.expires_at, next(self._order), sub))
        # Register, then check: a revocation that arrived after the door's token check (and
        # before this) finds no subscription to end, so the check is made again here, with no
        # yield since the registration; any later revocation finds it registered.
        if self.admits is not None and not self.admits(sub.jti, sub.subject, sub.issued_at):
            sub.close()
        return self.position

    def tap(self, stream: str, deliver: Callable[[list[LiveEvent]], None]) -> None:
        """Hand every event of `stream` to `deliver` (in position order, as a list per commit)
        instead of to subscribers of the stream: a door with its own fan-out rules (Mercure's
        topic selectors) on a stream only it writes. Its LiveEvents carry no body."""
        self._taps[stream] = deliver

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            for pattern in sub.patterns:
                self._patterns.remove(pattern)
                subs = self._by_pattern.get(pattern)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._by_pattern[pattern]
        self._subs.discard(sub)
        for stream in sub.streams:
            subs = self._by_stream.get(stream)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_stream[stream]
        sub.close()

    def busiest_streams(self, n: int) -> dict[str, int]:
        """This process's exact-stream subscriber counts, the `n` largest."""
        top = sorted(self._by_stream.items(), key=lambda kv: len(kv[1]), reverse=True)[:n]
        return {stream: len(subs) for stream, subs in top}

    def subscriber_count(self, stream: str | None = None) -> int:
        if stream is not None:
            return len(self._by_stream.get(stream, ()))
        return len(self._subs)

    def missing_streams(self, streams: Iterable[str]) -> set[str]:
        """The streams that do not exist. A stream seen to exist is trusted for
        `stream_cache_s`, so a reconnect storm does not queue on the pool; deleting a stream
        forgets it at once in every process (the relay's `end` message)."""
        now = time.monotonic()
        ask = [s for s in streams if self._known.get(s) is None]
        if not ask:
            return set()
        with self.pool.connection() as conn:
            found = self.store.existing_streams(conn, ask)
        until = now + self.stream_cache_s
        for stream in found:
            self._known.put(stream, True, until)
        return set(ask) - found

    def revoke(self, kind: str, value: str, at: float) -> int:
        """End the subscriptions a revoked token admitted: by `jti`, or every token of subject
        `value` issued at or before `at`. Returns how many ended (each gets a final `retry:`)."""
        ended = 0
        for sub in list(self._subs):
            if (kind == "jti" and sub.jti == value) or (
                kind == "sub" and sub.subject == value and (sub.issued_at is None or sub.issued_at <= at)
            ):
                self.unsubscribe(sub)
                ended += 1
        return ended

    def _expire(self) -> None:
        """End subscriptions whose credential expired (a heap: the soonest first)."""
        now = time.time()
        while self._expiry and self._expiry[0][0] <= now:
            _, _, sub = heapq.heappop(self._expiry)
            if sub in self._subs:
                self.unsubscribe(sub)
        if len(self._expiry) > 2 * len(self._subs) + 1024:  # bounded: drop ended subscriptions
            self._expiry = [e for e in self._expiry if e[2] in self._subs]
            heapq.heapify(self._expiry)

    def _tick(self) -> None:
        """Every second: credentials that expired. Every half heartbeat: heartbeats for quiet
        subscribers, and writes stuck past `write_timeout_s` ended. One timer per process."""
        interval = min(self.heartbeat_s, self.write_timeout_s) / 2
        step = min(1.0, interval)
        scanned = time.monotonic()
        while True:
            gevent.sleep(step)
            self._expire()
            now = time.monotonic()
            if now - scanned < interval:
                continue
            scanned = now
            for sub in list(self._subs):
                if sub.writing_since and now - sub.writing_since > self.write_timeout_s:
                    if sub.on_stuck is not None:
                        sub.on_stuck()
                    self.unsubscribe(sub)
                elif not sub.writing_since and now - sub.active_at >= self.heartbeat_s and sub.queue.empty():
                    sub.active_at = now
                    sink = sub.sink
                    if sink is not None:  # an idle parked connection: write it here
                        sink.write(self.framing.heartbeat())
                        continue
                    try:
                        sub.queue.put_nowait(HEARTBEAT)
                    except Full:
                        pass

    # -- commits in -----------------------------------------------------------------------------
    def on_commit(self, commit: Commit) -> None:
        """Batcher listener: the relay sends the batch to the other processes and to this hub."""
        self.relay.publish_commit(commit)

    def end_stream(self, stream: str) -> None:
        """A stream was deleted: tell its subscribers in every process."""
        self._known.pop(stream)
        self.relay.publish_end(stream)

    def _end(self, stream: str) -> None:
        self._known.pop(stream)
        for sub in list(self._by_stream.get(stream, ())):
            try:
                sub.queue.put_nowait(StreamEnded(stream))
            except Full:
                pass  # it is being cut loose anyway; its reconnect will get 404
            self.unsubscribe(sub)

    # -- ordering -----------------------------------------------------------------------------
    def _wake(self) -> None:
        self._wake_filler.set()

    def _receive(self, after: int, upto: int, events: Events) -> None:
        if upto <= self.position:
            return  # already delivered (our own message after a local fallback, or a re-read)
        if after > self.position:
            self._held[after] = (upto, events)
            self._wake_filler.set()
            return
        self._advance(events, upto)
        self._release_held()

    def _advance(self, events: Events, upto: int) -> None:
        """Hand what lies beyond the position to the deliverer, and move the position. Filtering
        by position makes a fill from Postgres and a late Redis message safe to overlap: nothing
        goes out twice.

        The position moves before the delivery is written: a subscriber that joins meanwhile
        reads these events from the store (they are committed) AND gets them live; its writer
        skips what it was sent already (`Subscription.last`), so it sees each once."""
        fresh = [e for e in events if e[0] > self.position]
        self.position = max(self.position, upto)
        if not fresh:
            return
        self.activity.record(fresh)
        self._outbox.append(fresh)
        self._outbox_events += len(fresh)
        self._outbox_ready.set()
        deliverer = self._deliverer
        while (
            self._outbox_events > OUTBOX_EVENTS
            and deliverer is not None
            and not deliverer.dead
            and gevent.getcurrent() is not deliverer
        ):
            self._outbox_room.clear()
            self._outbox_room.wait(timeout=1.0)  # and look again: a stopped deliverer frees it

    def _deliver_forever(self) -> None:
        """The deliverer: each pass takes every waiting commit (up to `MERGE_EVENTS` events)."""
        outbox = self._outbox
        while True:
            self._outbox_ready.wait()
            self._outbox_ready.clear()
            while outbox:
                events = outbox.popleft()
                while outbox and len(events) + len(outbox[0]) <= MERGE_EVENTS:
                    events = events + outbox.popleft()
                self._outbox_events -= len(events)
                if self._outbox_events <= OUTBOX_EVENTS // 2:
                    self._outbox_room.set()
                try:
                    self._deliver(events)
                except Exception:  # one bad pass must not end live delivery
                    log.exception("hub delivery failed")

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
            self._wake_filler.wait(timeout=None if self.relay.up else self.poll_s)
            self._wake_filler.clear()
            try:
                if self._held:
                    gevent.sleep(self.gap_wait_s)
                    if self._held and min(self._held) > self.position:
                        self._fill_from_store(upto=min(self._held))
                        self._release_held()
                elif not self.relay.up:
                    latest = self.relay.last_position()
                    if latest > self.position:
                        self._fill_from_store(upto=latest)
            except Exception as exc:  # noqa: BLE001 - database down: try again shortly
                log.warning("hub could not read missing events: %s", exc)
                gevent.sleep(self.poll_s)
                self._wake_filler.set()

    def _fill_from_store(self, upto: int) -> None:
        while self.position < upto:
            events, covered = self.relay.read_range(self.position, upto)
            self._advance(events, covered)

    # -- fan-out ------------------------------------------------------------------------------
    def _deliver(self, events: Events) -> None:
        """One queue item per subscriber per delivery. Events are grouped by stream once; a
        subscriber of a single stream gets that shared list as is (one put per subscriber).
        Yields to the event loop every `FANOUT_SLICE` subscribers (who joins meanwhile is not
        among this delivery's targets: its catch-up covers it)."""
        by_stream: dict[str, list[LiveEvent]] = {}
        patterns = self._patterns
        tapped: dict[str, list[LiveEvent]] = {}
        for position, stream, event_type, data in events:
            if stream in self._taps:
                tapped.setdefault(stream, []).append(LiveEvent(position, stream, event_type, data, b""))
            elif stream in self._by_stream or (patterns and patterns.matching(stream)):
                by_stream.setdefault(stream, []).append(
                    LiveEvent(position, stream, event_type, data, self.framing.body(event_type, data))
                )
        merged: dict[Subscription, list[LiveEvent]] = {}
        room = FANOUT_SLICE
        for stream, lives in by_stream.items():
            found = set(self._by_stream.get(stream, ()))
            if patterns:
                for pattern in patterns.matching(stream):  # cached per stream name
                    # a pattern delivers only what a direct subscribe would admit (`user/42/*`
                    # matches `user/42/`, which the grant `user/42/**` does not)
                    found.update(
                        s for s in self._by_pattern.get(pattern, ()) if s.admits is None or s.admits(stream)
                    )
            targets = list(found)  # a set: a stream matched twice by one subscriber counts once
            count = len(lives)
            done = 0
            while done < len(targets):
                if room <= 0:
                    breathe()  # let requests and the next commits in
                    room = FANOUT_SLICE
                part = targets[done : done + room]
                done += len(part)
                room -= len(part)
                direct = 0
                for sub in part:
                    if len(sub.streams) == 1 and not sub.patterns:
                        sink = sub.sink
                        if sink is not None:  # `offer`'s first case, inlined: the hottest loop
                            direct += 1
                            sink(lives)
                        else:
                            self.offer(sub, lives)
                    else:
                        merged.setdefault(sub, []).extend(lives)
                self.delivered += direct * count
        for sub, lives in merged.items():
            lives.sort(key=lambda e: e.position)
            self.offer(sub, lives)
        for stream, lives in tapped.items():
            self._taps[stream](lives)

    def offer(self, sub: Subscription, lives: list[LiveEvent]) -> None:
        """One delivery to one subscriber: written by its idle connection's sink, else queued; a
        full queue cuts it loose. A closed subscription gets nothing more (its writer is ending
        it; the reconnect resumes from what it was sent)."""
        if sub.closed:
            return
        self.delivered += len(lives)
        sink = sub.sink
        if sink is not None:
            sink(lives)  # parked and idle with nothing queued: write now, without waiting
            return
        if not sub.offer(lives):
            self.overflows += 1
            if self.overflow_counter is not None:
                self.overflow_counter.inc()
            self.unsubscribe(sub)
