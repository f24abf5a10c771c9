"""Live SSE deliveries written by the hub straight to a parked connection's socket.

Through the WSGI path, every delivery to every subscriber costs a greenlet wake-up, a pass
through the response generator and werkzeug's iterator, pywsgi's chunk framing and a cooperative
`sendall`: about 50-60 µs of CPU on the 2-core machine, which caps one process near 15,000
single-event deliveries per second. A parked connection (streaming/connection.py) has no
greenlet while it is idle, and nothing else writes to its socket, so the hub writes the delivery
itself: build the chunk, make one non-blocking `send`, done.

The rules that keep this correct:
- The sink is set (`Subscription.sink`) only while the connection is idle: its queue is EMPTY
  and no writer runs. Anything the hub delivers while the sink is unset is queued as before, so
  bytes reach the socket in position order.
- The sink never waits. If the kernel takes only part of the chunk (the client reads slowly),
  the unsent rest is queued as `Unsent` and the sink unsets itself; the connection's writer
  starts, finishes those bytes with a cooperative write, and everything after them goes through
  the queue (and its bound) until the connection is idle again.
- A send error means the client is gone: the subscription is closed and its writer ends it.
- Chunked transfer encoding is framed (`streaming.sse.http_chunk`) as pywsgi frames it, so the
  connection's later chunks and its final `0` chunk continue one valid response.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from streaming.sse import http_chunk, http_chunk_of, id_prefix, with_position
from streaming.subscription import LiveEvent, Subscription


@dataclass(slots=True)
class Unsent:
    """The rest of a chunk the socket did not take; the writer must send it before anything."""

    data: bytes


class DirectSink:
    """One parked connection's sink: the hub calls it with a delivery while it is idle."""

    __slots__ = ("sub", "send", "id_prefix", "chunked")

    def __init__(self, sub: Subscription, raw_socket: Any, sid: str | None, chunked: bool) -> None:
        self.sub = sub
        self.send = raw_socket.send  # the parked connection's non-blocking socket
        self.id_prefix = None if sid is None else id_prefix(sid)  # None: bodies carry their id
        self.chunked = chunked

    def write(self, data: bytes) -> None:
        """Bytes framed already (a heartbeat), as one chunk."""
        self._send(http_chunk(data) if self.chunked else data)

    def __call__(self, lives: list[LiveEvent]) -> None:
        sub = self.sub
        last = sub.last
        prefix = self.id_prefix
        if len(lives) == 1 and prefix is not None and not sub.envelope:
            # The common delivery (one event, native framing): one bytes formatting in all,
            # from the event's shared `<position>\n<body>` tail.
            event = lives[0]
            if event.position <= last:
                return
            tail = event.tail()
            payload = http_chunk_of(prefix, tail) if self.chunked else prefix + tail
        else:
            if prefix is None:
                parts = [e.body for e in lives if e.position > last]
            elif sub.envelope:
                parts = [with_position(prefix, e.position, e.envelope()) for e in lives if e.position > last]
            else:
                parts = [prefix + e.tail() for e in lives if e.position > last]
            if not parts:
                return
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            if self.chunked:
                payload = http_chunk(payload)
        sub.last = lives[-1].position
        self._send(payload)

    def _send(self, payload: bytes) -> None:
        sub = self.sub
        try:
            sent = self.send(payload)
        except BlockingIOError:
            sent = 0
        except OSError:
            sub.sink = None
            sub.close()  # the client went away: its writer starts and ends the connection
            return
        sub.active_at = time.monotonic()
        if sent < len(payload):
            sub.sink = None
            sub.queue.put_nowait(Unsent(payload[sent:]))  # the queue was empty: this fits
