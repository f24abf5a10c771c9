"""One SSE connection, from its preamble to its final `retry:`.

`SSEConnection.stream()` is the response body: the preamble (`retry:` and the connection's
position), then catch-up pages from the store. Then, under Sluice's pywsgi handler, the
connection *parks* (`StreamWriter._park`): it takes its socket over from pywsgi, whose handler,
greenlet and request objects are then freed, and lives on as its subscription, a socket, a
disconnect watcher and the hub's direct sink. The hub writes each live delivery to an idle
parked connection itself (streaming/direct.py); a short-lived writer greenlet (`_pump`) starts
only when something is queued (a write the socket did not take at once, a burst behind it, the
end), and exits when the queue is empty again. Elsewhere (TLS, another server) the response
generator goes on with the live deliveries from the queue (`_live`). At the end: a `retry:` hint
or, for a deleted stream, `event: end`. The hub's one ticker sends heartbeats and ends stuck
writes; `DisconnectWatch` notices a client that left while its stream is idle.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import gevent
import orjson
from gevent.socket import wait_write

from ingest.ids import format_position
from ingest.pool import DatabaseUnavailable
from ingest.reads import history_gone
from streaming.catchup import catch_up, streams_for
from streaming.checks import Checked, subscribe_checked
from streaming.deps import StreamingServices
from streaming.direct import DirectSink, Unsent
from streaming.sse import EventStreamFraming, envelope_body, envelope_reset, http_chunk
from streaming.subscription import HEARTBEAT, LiveEvent, StreamEnded, Subscription, bound_sid

log = logging.getLogger("sluice.stream")
framing = EventStreamFraming()
COALESCE_MAX = 64  # queued deliveries written in one go
PARKED_KEY = "sluice.parked"  # environ: the connection that took the response over (at_end)
LAST_CHUNK = b"0\r\n\r\n"


def shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class DisconnectWatch:
    """Notices a client that went away while its stream is idle, without a greenlet of its own
    (a parked greenlet per connection costs ~10 KB): an I/O watcher on the event loop calls back
    when the socket turns readable. EventSource sends nothing after its request, so readable
    means closed (or, for a client that does send bytes, nothing to act on: stop watching)."""

    def __init__(self, sock: Any, sub: Subscription) -> None:
        self.raw = getattr(sock, "_sock", sock)
        self.sub = sub
        self.io: Any = gevent.get_hub().loop.io(sock.fileno(), 1)  # 1 = readable
        self.io.start(self._readable)

    def _readable(self) -> None:
        try:
            if self.raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                self.stop()  # the client sent bytes: not an EventSource; nothing to close
                return
        except BlockingIOError:
            return  # woken for nothing: keep watching
        except OSError:
            pass
        self.stop()
        self.sub.close()

    def stop(self) -> None:
        if self.io is not None:
            self.io.stop()
            self.io.close()
            self.io = None


class StreamWriter:
    """What every event-stream connection shares once its subscription exists: stamped writes
    (so the hub's ticker sees a stuck one), the disconnect watch, parking, and the live loop
    for a connection that cannot park. Subclasses say how an event is framed (`_framed`)."""

    svc: StreamingServices
    sub: Subscription
    environ: dict[str, Any] | None  # dropped once parked
    seam: int  # live delivery starts after this position (the hub's, at subscribe)
    start: int  # the position this connection resumes after
    opened_at: float
    retry_ms: int
    pace_key: str  # reconnect pacing is keyed by this
    sink_sid: str | None = None  # the `id:` prefix of direct writes; None: bodies carry their id

    release: Callable[[], None]  # gives back the connection-limit slots
    ended: bool = False
    parked: bool = False
    raw: Any = None  # a parked connection's socket
    chunked: bool = False  # ... and whether its response is chunk-framed
    sink: DirectSink | None = None
    pumping: bool = False  # a parked connection's writer greenlet runs
    deleted: bool = False  # the stream was deleted: no `retry:` after `event: end`
    _at_end: list[Callable[[], None]] | None = None

    def end(self) -> None:
        """Leave everything the connection joined and give back its limit slots, once (from
        the stream's end, or when the response is closed)."""
        if self.ended:
            return
        self.ended = True
        self._leave()
        self.release()

    def response_closed(self) -> None:
        """pywsgi is done with the response: the connection ends now, unless it parked (then
        its own writer ends it, later). The body may never have started (the headers failed,
        the client left first): the disconnect watch goes too, before pywsgi closes the socket
        it watches."""
        if not self.parked:
            self._unwatch()
            self.end()

    def at_end(self, callback: Callable[[], None]) -> None:
        """Call `callback` when a parked connection has written its last byte (the request
        log's line), or now if it has."""
        if self.ended:
            callback()
        else:
            self._at_end = (self._at_end or []) + [callback]

    def _leave(self) -> None:
        raise NotImplementedError

    def _from_now(self) -> None:
        """Start after the last commit, which the hub may not have heard of yet (a client that
        just published must not get that event as live); the hub's position if the database
        cannot say."""
        try:
            with self.svc.pool.connection() as conn:
                self.start = max(self.seam, self.svc.store.last_position(conn))
        except DatabaseUnavailable:
            pass

    def _finish(self) -> None:
        """After the last byte: a connection that stayed up resets its reconnect pacing (its
        next reconnect starts short), then it leaves everything it joined."""
        self.sub.sink = None
        if (
            time.monotonic() - self.opened_at >= self.svc.settings.retry_reset_after_s
            and not self.sub.overflowed
        ):
            self.svc.backoff.healthy(self.pace_key)
        self.end()
        self._unwatch()

    def _watch(self) -> None:
        environ = self.environ or {}
        self.sock = environ.get("sluice.socket") or environ.get("gunicorn.sock")
        self.watcher: DisconnectWatch | None = None
        if self.sock is not None:
            sock = self.sock
            self.sub.on_stuck = lambda: shutdown(sock)  # the hub's ticker ends a stuck write
            self.watcher = DisconnectWatch(sock, self.sub)

    def _unwatch(self) -> None:
        self.sub.sink = None
        if self.watcher is not None:
            self.watcher.stop()

    def _frame_lives(self, lives: list[LiveEvent], out: list[bytes]) -> None:
        """Append the bytes of each event not sent yet (a seam overlap is skipped)."""
        sub = self.sub
        for e in lives:
            if e.position > sub.last:
                out.append(self._framed(e))
                sub.last = e.position

    def _framed(self, event: LiveEvent) -> bytes:
        raise NotImplementedError

    def _frame(self, items: list[Any]) -> tuple[list[bytes], StreamEnded | bool]:
        """The bytes for queued items, and whether (or how) the subscription ended among them."""
        out: list[bytes] = []
        for item in items:
            if item is None:
                return out, True
            if item is HEARTBEAT:
                out.append(framing.heartbeat())
                continue
            if isinstance(item, StreamEnded):
                return out, item
            self._frame_lives(item, out)
        return out, False

    def _take(self, first: Any) -> tuple[bytes, bool]:
        """`first` and what else is queued (coalesced: one write), as bytes; and whether the
        connection ends with them (closed, or deleted: then `event: end` is among the bytes)."""
        sub = self.sub
        items = [first]
        while not sub.queue.empty() and len(items) < COALESCE_MAX:
            items.append(sub.queue.get_nowait())
        out, ended = self._frame(items)
        if isinstance(ended, StreamEnded):
            # Deleted: say so and end; the reconnect gets 404 and EventSource stops.
            out.append(framing.end(orjson.dumps({"stream": ended.stream}).decode()))
            self.deleted = True
        return b"".join(out), bool(ended) or (sub.closed and sub.queue.empty())

    # -- writing from the response generator --------------------------------------------------
    def _write(self, data: bytes) -> Iterator[bytes]:
        """Yield one chunk to pywsgi, stamped so the hub's ticker can see a stuck write."""
        sub = self.sub
        sub.writing_since = time.monotonic()
        yield data
        sub.writing_since = 0.0
        sub.active_at = time.monotonic()

    def _live(self) -> Generator[bytes, None, bool]:
        """Deliveries until the subscription closes, for a connection that could not park;
        returns True if the stream was deleted (it said `event: end` and must not add a
        `retry:`)."""
        while True:
            item = self.sub.queue.get()  # the hub's ticker queues heartbeats: no timer here
            data, ended = self._take(item)
            if data:
                yield from self._write(data)
            if ended:
                return self.deleted

    # -- parked -------------------------------------------------------------------------------
    def _park(self) -> bool:
        """Take the socket over from pywsgi if its handler allows (streaming.direct's rules then
        apply); True if parked: the response generator must end now, without another byte."""
        environ = self.environ or {}
        park = getattr(environ.get("sluice.handler"), "park", None)
        taken = park() if park is not None else None
        if taken is None:
            return False
        self.raw, self.chunked = taken
        self.parked = True
        environ[PARKED_KEY] = self  # the request log's line waits for the real end
        self.environ = None  # pywsgi frees it, and everything else of the request
        self._unwatch()
        raw, sub = self.raw, self.sub
        self.sock = None
        sub.on_stuck = lambda: shutdown(raw)
        self.watcher = DisconnectWatch(raw, sub)
        self.sink = DirectSink(sub, raw, self.sink_sid, self.chunked)
        sub.queue.on_put = self._wake
        if sub.queue.empty():
            sub.sink = self.sink  # idle: the hub writes the next delivery itself
        else:
            self._wake()
        return True

    def _wake(self) -> None:
        """Something was queued for a parked connection: its writer runs until the queue is
        empty again."""
        if not self.pumping:
            self.pumping = True
            self.sub.sink = None
            gevent.spawn_raw(self._pump)

    def _pump(self) -> None:
        """A parked connection's writer: what is queued, in order, then back to idle (the hub's
        sink) or, once the subscription closed, the last bytes and the socket's close."""
        sub = self.sub
        try:
            while True:
                if sub.queue.empty():
                    if not sub.closed:
                        sub.sink = self.sink
                        self.pumping = False
                        return  # idle again: no greenlet until something is queued
                    break
                item = sub.queue.get_nowait()
                if isinstance(item, Unsent):
                    self._send(item.data)  # the rest of a direct write, chunk-framed already
                    continue
                data, ended = self._take(item)
                if data:
                    self._send(self._chunk(data))
                if ended:
                    break
            # Cut loose (queue full), the server is stopping, or the client left: tell it when
            # to come back; Last-Event-ID resumes it from `last` with nothing missed.
            tail = b"" if self.deleted else self._chunk(framing.retry_only(self.retry_ms))
            self._send(tail + LAST_CHUNK if self.chunked else tail)
        except OSError:
            pass  # the client went away (or its write was stuck): nothing more to send
        except Exception:  # a writer must always close its connection
            log.exception("stream writer failed")
        self._close_parked()

    def _chunk(self, data: bytes) -> bytes:
        return http_chunk(data) if self.chunked else data

    def _send(self, data: bytes) -> None:
        """A cooperative write of all of `data`, stamped for the hub's ticker (which shuts a
        stuck one down); bounded by the hub's write timeout even when the ticker is gone."""
        sub, raw = self.sub, self.raw
        sub.writing_since = time.monotonic()
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = raw.send(view)
                except BlockingIOError:
                    sent = 0
                if sent:
                    view = view[sent:]
                else:
                    wait_write(raw.fileno(), timeout=self.svc.hub.write_timeout_s)
        finally:
            sub.writing_since = 0.0
        sub.active_at = time.monotonic()

    def _close_parked(self) -> None:
        self.sub.queue.on_put = None
        self.sub.sink = None
        self._unwatch()
        try:
            self.raw.close()
        except OSError:
            pass
        self._finish()
        callbacks, self._at_end = self._at_end or [], None
        for callback in callbacks:
            callback()


class SSEConnection(StreamWriter):
    """A subscription admitted by the checks, and everything it writes (native door)."""

    def __init__(
        self,
        svc: StreamingServices,
        checked: Checked,
        sid: str,
        retry_ms: int,
        environ: dict[str, Any],
        release: Callable[[], None],
        *,
        hello: bool = False,
        envelope: bool = False,
    ) -> None:
        self.svc = svc
        self.checked = checked
        self.sid = sid
        self.retry_ms = retry_ms
        self.environ = environ
        self.release = release
        self.hello = hello
        self.opened_at = time.monotonic()
        self.takeover = checked.sid is not None  # a reconnect: an older connection loses
        self.sub, self.seam = subscribe_checked(svc, checked)
        self.sub.envelope = envelope
        self.start = self.seam if checked.resume is None else checked.resume
        svc.presence.join(self.sub, sid, checked.subject, takeover=self.takeover)
        self.sink_sid = sid
        self.pace_key = bound_sid(checked.subject, sid)
        self._watch()

    def _leave(self) -> None:
        """Presence first (the leave is recorded), then the hub."""
        self.svc.presence.leave(self.sub, self.sid, self.checked.subject, takeover=self.takeover)
        self.svc.hub.unsubscribe(self.sub)

    # -- the response body --------------------------------------------------------------------
    def stream(self) -> Iterator[bytes]:
        sub = self.sub
        if self.checked.resume is None:
            self._from_now()
        sub.last = self.start
        try:
            preamble = framing.preamble(self.retry_ms, f"{self.sid}.{format_position(self.start)}")
            if self.hello:  # opt-in: a visible first event, so a client can tell its stream works
                preamble += framing.body("hello", orjson.dumps({"sid": self.sid}).decode())
            yield from self._write(preamble)
            try:
                if self.checked.resume is not None:
                    reset = self._reset()
                    if reset is not None:  # history gone: say so before what is left
                        yield from self._write(reset)
                if (yield from self._catch_up()):
                    return  # the client left during catch-up
            except DatabaseUnavailable:
                yield framing.retry_only(self.svc.backoff.retry_ms(2))
                return
            sub.last = max(sub.last, self.seam)
            if self._park():
                return  # its own writer goes on; pywsgi lets go of the connection
            if (yield from self._live()):
                return
            # Cut loose (queue full), the server is stopping, or the client left: tell it when
            # to come back; Last-Event-ID resumes it from `last` with nothing missed.
            yield framing.retry_only(self.retry_ms)
        finally:
            if not self.parked:
                self._finish()

    def _reset(self) -> bytes | None:
        """`event: reset` if history after the resume point is gone (no id: the resume
        position stays); as a `message` envelope for `?envelope=1` clients."""
        with self.svc.pool.connection() as conn:
            notice = history_gone(self.svc.store, conn, self.checked.streams, self.start)
        if notice is None:
            return None
        data = orjson.dumps(notice).decode()
        return envelope_reset(data) if self.sub.envelope else framing.body("reset", data)

    def _catch_up(self) -> Generator[bytes, None, bool]:
        """History pages up to the seam; returns True if the subscription closed meanwhile."""
        sub = self.sub
        streams = (
            streams_for(
                self.svc.pool,
                self.svc.store,
                self.checked.streams,
                self.checked.patterns,
                self.checked.admits,
            )
            if self.start < self.seam
            else []
        )
        for rows in catch_up(
            self.svc.pool, self.svc.store, streams, self.start, self.seam, self.svc.settings.catchup_page
        ):
            if sub.closed and not sub.overflowed:
                return True
            if sub.envelope:
                out = b"".join(
                    framing.with_id(f"{self.sid}.{row.id}", envelope_body(row.type, row.data)) for row in rows
                )
            else:
                out = b"".join(framing.encode(f"{self.sid}.{row.id}", row.type, row.data) for row in rows)
            yield from self._write(out)
            sub.last = rows[-1].position
        return False

    def _framed(self, event: LiveEvent) -> bytes:
        return framing.with_id(
            f"{self.sid}.{event.position}", event.envelope() if self.sub.envelope else event.body
        )
