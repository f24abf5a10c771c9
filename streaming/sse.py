"""Every SSE byte Sluice writes: the framing (how one update becomes bytes on the wire), the
`?envelope=1` body, the per-connection `id:` line and the HTTP chunk of the hub's direct writes.

A framing has four small parts: its content type, a preamble (the `retry:` hint and the
connection's position), one encoded update, and a heartbeat; the SSE endpoint, the dashboard's
stats stream and the hub (one shared body per event) all write through `EventStreamFraming`.
Long-poll answers JSON and shares the subscription, not the framing.

Event data reaches here already JSON-encoded at ingest, so it is encoded once per event, never
per subscriber, and JSON text cannot hold a raw CR or LF: nothing a publisher sends can start a
new SSE field or event.
"""

from __future__ import annotations

from typing import Protocol

_LINE_BREAKS = ("\r", "\n")


class Framing(Protocol):
    """A wire format for a subscription."""

    content_type: str

    def preamble(self, retry_ms: int, event_id: str) -> bytes: ...

    def encode(self, event_id: str, event_type: str, data: str) -> bytes: ...

    def body(self, event_type: str, data: str) -> bytes: ...

    def with_id(self, event_id: str, body: bytes) -> bytes: ...

    def heartbeat(self) -> bytes: ...


def _single_line(name: str, value: str) -> str:
    if any(c in value for c in _LINE_BREAKS) or "\x00" in value:
        raise ValueError(f"SSE {name} must be one line without NUL: {value!r}")
    return value


class EventStreamFraming:
    """text/event-stream (Server-Sent Events, as EventSource reads it)."""

    content_type = "text/event-stream"

    def preamble(self, retry_ms: int, event_id: str) -> bytes:
        """`retry:` first, then an `id:` with no data: it sets EventSource's lastEventId (the
        connection id travels in it) without firing a message event."""
        return f"retry: {int(retry_ms)}\nid: {_single_line('id', event_id)}\n\n".encode()

    def encode(self, event_id: str, event_type: str, data: str) -> bytes:
        return self.with_id(event_id, self.body(event_type, data))

    def body(self, event_type: str, data: str) -> bytes:
        """The part of an event shared by every subscriber: encoded once per event."""
        return (
            f"event: {_single_line('event', event_type)}\ndata: {_single_line('data', data)}\n\n"
        ).encode()

    def with_id(self, event_id: str, body: bytes) -> bytes:
        """Prefix the per-connection id (it carries the connection id) to a shared body."""
        return f"id: {_single_line('id', event_id)}\n".encode() + body

    def heartbeat(self) -> bytes:
        return b":\n\n"

    def end(self, stream_json: str) -> bytes:
        """The stream was deleted: a final `end` event (no id: the resume position stays)."""
        return f"event: end\ndata: {_single_line('data', stream_json)}\n\n".encode()

    def retry_only(self, retry_ms: int) -> bytes:
        """What a stream says when it must end: come back in `retry_ms`."""
        return f"retry: {int(retry_ms)}\n\n".encode()


# -- bytes shared by every subscriber, and the hub's direct writes -----------------------------


def envelope_body(event_type: str, data: str) -> bytes:
    """`event: message` with `{"type": ..., "data": ...}`: EventSource hands every type to one
    `message` listener. Types match the event type rule (ingest.schema): nothing to escape."""
    return b'event: message\ndata: {"type":"%s","data":%s}\n\n' % (event_type.encode(), data.encode())


def envelope_reset(notice_json: str) -> bytes:
    """The history-gone notice for `?envelope=1` subscribers: a `message` whose data is
    `{"reset": {...}}` (no `type` key, so it cannot be mistaken for an event called reset)."""
    return b'event: message\ndata: {"reset":%s}\n\n' % _single_line("data", notice_json).encode()


def id_prefix(sid: str) -> bytes:
    """The start of every `id:` line of one connection (a sid is [a-z2-7]: safe as is)."""
    return b"id: " + sid.encode("ascii") + b"."


def with_position(prefix: bytes, position: int, body: bytes) -> bytes:
    """One event for one connection: its `id: <sid>.<position>` line, then the shared body."""
    return b"%s%d\n%s" % (prefix, position, body)


def http_chunk_of(prefix: bytes, tail: bytes) -> bytes:
    """`http_chunk(prefix + tail)` in one formatting (the hub's most frequent write)."""
    return b"%x\r\n%s%s\r\n" % (len(prefix) + len(tail), prefix, tail)


def http_chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk, framed exactly as gevent's pywsgi frames the chunks it writes, so a
    direct write and pywsgi's own writes continue one valid chunked response."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)
