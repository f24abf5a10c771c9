"""How commits travel between processes: Redis pub/sub when it is up, Postgres when it is not.

After each batch commits, the batcher's listener publishes ONE Redis message for the whole batch
on one channel, `{"p": origin, "a": after, "u": upto, "e": [[position, stream, type, data], ...]}`,
and every process holds ONE Redis subscription to it. The committing process hands the batch to
its own hub at once, without waiting for Redis to send it back: its own messages, which start
with its origin (a random id per process), are dropped unparsed when they arrive (measured: the
echo's parse was ~7% of the server's CPU under batched ingest). A message without an origin
is delivered as any other. A deleted stream is announced on the same channel as
`{"end": stream}`. Without Redis the hub reads what other processes committed from Postgres
(`read_range`, `last_position`), so delivery continues.

The pub/sub reconnect loop is `common.pubsub.subscribe_forever` (presence and revocations use it
too).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from gevent.event import Event

from common.pubsub import subscribe_forever
from ingest.events import Commit
from ingest.pool import Pool
from ingest.store import EventStore

log = logging.getLogger("sluice.relay")

CHANNEL = "sluice:commits"  # default Redis channel: one message per committed batch
FILL_PAGE = 2000  # rows per Postgres read when filling a hole

# A batch as it travels: [[position, stream, type, data], ...]
Events = list[list[Any]]


class Relay:
    """Carries commits and stream deletions to every process's hub, and reads the store for
    what a hub missed. `receive(after, upto, events)` and `end(stream)` are the hub's."""

    def __init__(
        self, store: EventStore, pool: Pool, redis: Any, *, channel: str = CHANNEL, retry_s: float = 1.0
    ) -> None:
        self.store = store
        self.pool = pool
        self.redis = redis
        self.channel = channel
        self.retry_s = retry_s
        self.up = False  # subscribed to Redis right now
        self.receive: Callable[[int, int, Events], None] = lambda after, upto, events: None
        self.end: Callable[[str], None] = lambda stream: None
        self.changed: Callable[[], None] = lambda: None  # Redis came or went: look for holes
        self.subscribed = Event()
        self.origin = uuid.uuid4().hex[:16]  # this process, in the messages it publishes
        self._own = orjson.dumps({"p": self.origin})[:-1] + b","  # how its messages start

    # -- out ------------------------------------------------------------------------------------
    def publish_commit(self, commit: Commit) -> None:
        """Batcher listener: send the batch once to the other processes, then to this one's hub
        (which may wait there while its outbox is full: backpressure on the batcher)."""
        events = [
            [w.id, w.stream, ev.type, ev.data]
            for req in commit.requests
            for ev, w in zip(req.events, req.results or (), strict=False)
            if not w.duplicate
        ]
        self._publish(orjson.dumps({"p": self.origin, "a": commit.after, "u": commit.upto, "e": events}))
        self.receive(commit.after, commit.upto, events)

    def publish_end(self, stream: str) -> None:
        """A stream was deleted: tell its subscribers in every process."""
        if not self._publish(orjson.dumps({"end": stream})):
            self.end(stream)

    def _publish(self, message: bytes) -> bool:
        if not self.up:
            return False
        try:
            self.redis.publish(self.channel, message)
            return True
        except Exception:  # noqa: BLE001 - the caller delivers locally instead
            log.warning("redis publish failed; delivering locally")
            self.up = False
            return False

    # -- in -------------------------------------------------------------------------------------
    def listen(self) -> None:
        """The process's one Redis subscription (runs in its own greenlet until killed)."""
        subscribe_forever(
            self.redis, self.channel, self._message, on_up=self._up, on_down=self._down, retry_s=self.retry_s
        )

    def _message(self, data: bytes) -> None:
        if data.startswith(self._own):
            return  # this process's own commit: its hub has it already
        doc = orjson.loads(data)
        if "end" in doc:
            self.end(doc["end"])
        else:
            self.receive(doc["a"], doc["u"], doc["e"])

    def _up(self) -> None:
        self.up = True
        self.subscribed.set()
        self.changed()  # messages may have been lost while it was down

    def _down(self, exc: Exception) -> None:
        if self.up:
            log.warning("redis subscription lost (%s); polling Postgres", exc)
        self.up = False
        self.subscribed.set()
        self.changed()

    # -- the store --------------------------------------------------------------------------------
    def last_position(self) -> int:
        with self.pool.connection() as conn:
            return self.store.last_position(conn)

    def read_range(self, after: int, upto: int) -> tuple[Events, int]:
        """Committed events in (after, upto], one page, and the position the page covers up to."""
        with self.pool.connection() as conn:
            rows = self.store.read_events(conn, after=after, upto=upto, limit=FILL_PAGE)
        covered = rows[-1].position if len(rows) == FILL_PAGE else upto
        return [[r.position, r.stream, r.type, r.data] for r in rows], covered
