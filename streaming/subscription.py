"""What a subscriber is to the hub: its streams and bounded queue (`Subscription`), and what
that queue carries: deliveries of `LiveEvent`s, `HEARTBEAT`, `StreamEnded`, or None (closed)."""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gevent import get_hub
from gevent._waiter import Waiter
from gevent.queue import Empty, Full

from streaming.sse import envelope_body


class Mailbox:
    """A subscriber's bounded queue, one reader at most, sized for thousands of idle ones.

    gevent's `Queue` allocates three deques (~3 KB) per subscriber up front; an idle subscriber
    here holds none: the deque exists only while something is queued, and a waiting reader
    holds one `Waiter`. `on_put`, if set, is called after each put instead of waking a reader
    (a parked connection starts its writer that way, streaming/connection.py).
    """

    __slots__ = ("maxsize", "_items", "_waiter", "on_put")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Any] | None = None
        self._waiter: Waiter | None = None
        self.on_put: Callable[[], None] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        items = self._items
        if items is None:
            items = self._items = deque()
        elif len(items) >= self.maxsize:
            raise Full
        items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            get_hub().loop.run_callback(waiter.switch, None)
        elif self.on_put is not None:
            self.on_put()

    def get_nowait(self) -> Any:
        items = self._items
        if not items:
            raise Empty
        item = items.popleft()
        if not items:
            self._items = None  # an idle subscriber keeps no deque
        return item

    def get(self) -> Any:
        """The next item, waiting for it (a `gevent.Timeout` around the call bounds the wait)."""
        while not self._items:
            waiter = self._waiter = Waiter()
            try:
                waiter.get()
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self.get_nowait()


@dataclass(slots=True)
class LiveEvent:
    """A committed event on its way to subscribers; `body` is shared by all of them."""

    position: int
    stream: str
    type: str
    data: str
    body: bytes
    _envelope: bytes | None = None
    _tail: bytes | None = None

    def tail(self) -> bytes:
        """`<position>\n` and the body: what follows a connection's `id: <sid>.` prefix, built
        once per event for all of them (streaming.sse.with_position's bytes, split)."""
        if self._tail is None:
            self._tail = b"%d\n%s" % (self.position, self.body)
        return self._tail

    def envelope(self) -> bytes:
        """The body for `?envelope=1` subscribers (a `message` whose data carries the type),
        built once per event for all of them."""
        if self._envelope is None:
            self._envelope = envelope_body(self.type, self.data)
        return self._envelope


@dataclass(frozen=True)
class StreamEnded:
    """Queued instead of a delivery when one of the subscription's streams was deleted."""

    stream: str


HEARTBEAT = "heartbeat"  # queued by the hub's ticker when a subscriber has been quiet


class Sink(Protocol):
    """What the hub writes an idle parked connection's deliveries with (streaming/direct.py)."""

    def __call__(self, lives: list[LiveEvent]) -> None: ...

    def write(self, data: bytes) -> None: ...


@dataclass(eq=False, slots=True)
class Subscription:
    """One subscriber: its streams, decided once, and its bounded queue of deliveries.

    Its writer stamps `active_at` after each write and `writing_since` while a write is in
    progress, so the hub's one ticker can send heartbeats and end stuck writes for everyone,
    instead of a timer per subscriber per wait.
    """

    streams: frozenset[str]
    queue: Mailbox
    patterns: frozenset[str] = frozenset()  # `room/*`-style: every matching stream, even later
    admits: Callable[[str], bool] | None = None  # with patterns: the grant each match must pass
    overflowed: bool = False
    closed: bool = False
    active_at: float = field(default_factory=time.monotonic)
    writing_since: float = 0.0
    on_stuck: Callable[[], None] | None = None
    last: int = 0  # the last position this subscriber was sent
    envelope: bool = False  # `?envelope=1`: every event as a typed message
    # Who admitted it: ended when the credential expires or is revoked (the hub's ticker).
    expires_at: float = 0.0  # unix time; 0: never
    jti: str | None = None
    subject: str = ""
    issued_at: float | None = None
    # Set only while a parked connection is idle (an empty queue, no writer running): the hub
    # then hands deliveries to it directly (it must not wait; it queues what it could not
    # write, and unsets itself).
    sink: Sink | None = None

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


def bound_sid(subject: str, sid: str) -> str:
    """What pacing and takeover key a connection id by: the id within its subject, so another
    subject reusing a victim's sid neither spends the victim's reconnect budget nor takes its
    connection over."""
    return subject_key("s", subject, sid)


def subject_key(prefix: str, subject: str, other: str) -> str:
    """A short key for `other` within `subject` (a digest: both may be any text)."""
    digest = hashlib.sha256(f"{subject}\x00{other}".encode("utf-8", "surrogatepass"))
    return prefix + digest.hexdigest()[:24]
