"""Live SSE deliveries written by the hub straight to an idle connection's socket.

Through the WSGI path, every delivery to every subscriber costs a greenlet wake-up, a pass
through the response generator and werkzeug's iterator, pywsgi's chunk framing and a cooperative
`sendall`: about 50-60 µs of CPU on the 2-core machine, which caps one process near 15,000
single-event deliveries per second. Yet while a stream's writer waits on an empty queue nothing
else is writing to its socket, so the hub can write the delivery itself: build the chunk, make
one non-blocking `send`, done.

The rules that keep this correct:
- The writer offers its sink (`Subscription.sink`) only while it waits on an EMPTY queue, and
  takes it back the moment it wakes. Anything the hub delivers while the sink is unset is queued
  as before, so bytes reach the socket in position order.
- The sink never waits. If the kernel takes only part of the chunk (the client reads slowly),
  the unsent rest is queued as `Unsent` and the sink unsets itself; the writer wakes, finishes
  those bytes with a timed cooperative write, and everything after them goes through the queue
  (and its bound) until the writer is idle again.
- A send error means the client is gone: the subscription is closed and its writer ends.
- Chunked transfer encoding is framed (`streaming.sse.http_chunk`) exactly as pywsgi frames
  it, so the writer's later chunks and pywsgi's final `0` chunk continue one valid response.
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
    """One connection's sink: the hub calls it with a delivery while the writer is idle."""

    __slots__ = ("sub", "send", "id_prefix", "chunked")

    def __init__(self, sub: Subscription, raw_socket: Any, sid: str | None,
                 chunked: bool) -> None:
        self.sub = sub
        self.send = raw_socket.send        # the non-blocking OS socket under gevent's wrapper
        self.id_prefix = None if sid is None else id_prefix(sid)  # None: bodies carry their id
        self.chunked = chunked

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
                parts = [with_position(prefix, e.position, e.envelope()) for e in lives
                         if e.position > last]
            else:
                parts = [prefix + e.tail() for e in lives if e.position > last]
            if not parts:
                return
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            if self.chunked:
                payload = http_chunk(payload)
        sub.last = lives[-1].position
        try:
            sent = self.send(payload)
        except BlockingIOError:
            sent = 0
        except OSError:
            sub.sink = None
            sub.close()  # the client went away: its writer wakes and ends
            return
        sub.active_at = time.monotonic()
        if sent < len(payload):
            sub.sink = None
            sub.queue.put_nowait(Unsent(payload[sent:]))  # the queue was empty: this fits


def direct_sink(sub: Subscription, environ: dict[str, Any], sid: str | None) -> DirectSink | None:
    """A sink for this connection if it runs under Sluice's pywsgi handler with a plain TCP
    socket whose response headers are out; else None (the queue path serves it). With no
    `sid`, each event's body is written as it is (it carries its own `id:`)."""
    handler = environ.get("sluice.handler")
    sock = getattr(handler, "socket", None)
    raw = getattr(sock, "_sock", None)
    if handler is None or raw is None or not getattr(handler, "headers_sent", False):
        return None
    if type(sock).__module__ != "gevent._socket3":  # e.g. TLS: its bytes are not ours to write
        return None
    if raw.gettimeout() != 0.0:
        return None
    return DirectSink(sub, raw, sid, bool(handler.response_use_chunked))
