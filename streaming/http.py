"""HTTP for subscribers: Server-Sent Events (`/api/v1/sse`) and long-poll (`/api/v1/poll`).

Both share one mechanism: the same checks, all decided before the first byte (400 malformed,
401 token, 403 not granted, 404 unknown stream, each a problem body); the same hub subscription,
taken before catch-up so the seam between history and live has no gap and no duplicate; the
same catch-up reads in pages through the bounded pool. Only the framing differs.
"""
from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator

import gevent
import orjson
from flask import Blueprint, Response, request

from ingest.ids import format_position, parse_position
from ingest.pool import DatabaseUnavailable
from ingest.validation import valid_stream
from streaming.authorize import OriginUnavailable
from streaming.direct import Unsent, direct_sink
from streaming.hub import HEARTBEAT, StreamEnded, Subscription, envelope_body
from streaming.sse import EventStreamFraming
from streaming.limits import token_key
from streaming.tokens import unauthorized
from web.http import bearer_token, json_response, services
from web.problems import Problem

bp = Blueprint("streaming", __name__)
SID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
framing = EventStreamFraming()


@dataclass
class Checked:
    """A subscribe request that passed every check: what to send and from where."""

    streams: list[str]
    resume: int | None      # resume after this position; None means "from now"
    sid: str | None         # connection id carried in from Last-Event-ID or ?sid=
    subject: str = ""       # the token's subject
    token_key: str = ""     # identifies the credential, for MAX_CONNECTIONS_PER_TOKEN


def new_sid() -> str:
    return "".join(secrets.choice(SID_ALPHABET) for _ in range(10))


def parse_last_event_id(raw: str) -> tuple[str | None, int]:
    """`sid.position` or a bare `position` (as the ingest and read APIs give it)."""
    sid, dot, _ = raw.rpartition(".")
    position = parse_position(raw)
    if dot and (not sid or len(sid) > 32 or not all(c in SID_ALPHABET for c in sid)):
        raise ValueError("bad connection id")
    return (sid or None), position


def check_subscribe() -> Checked:
    """Every check a subscription needs, before anything is sent (raises a Problem)."""
    svc = services()
    settings = svc.settings
    streams = request.args.getlist("stream")
    if not streams:
        raise Problem(400, "invalid-parameter", "name at least one `stream`", field="stream")
    if len(streams) > settings.subscribe_max_streams:
        raise Problem(400, "too-many-streams", f"at most {settings.subscribe_max_streams} streams "
                      "per subscription", field="stream", limit=settings.subscribe_max_streams)
    for stream in streams:
        if not valid_stream(stream):
            raise Problem(400, "invalid-stream",
                          "stream names match ^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$", field="stream")
    streams = list(dict.fromkeys(streams))
    token = bearer_token(allow_query=True, allow_cookie=True)
    if token is not None:
        principal = svc.tokens.verify(token)
        key = token_key(token)
    elif svc.authorizer is not None:  # no token: ask the origin (raises OriginUnavailable)
        principal, key = svc.authorizer.authorize(request.headers, streams, request.remote_addr)
    else:
        raise unauthorized("a token is required (Authorization: Bearer <token>, ?token= or "
                           "the sluice_token cookie)")
    for stream in streams:
        if not principal.subscribe.allows(stream):
            raise Problem(403, "not-granted", f"the token does not grant `subscribe` on `{stream}`",
                          stream=stream)
    raw = request.headers.get("Last-Event-ID") or request.args.get("lastEventId") \
        or request.args.get("cursor")
    sid, resume = None, None
    if raw:
        try:
            sid, resume = parse_last_event_id(raw)
        except ValueError:
            raise Problem(400, "invalid-last-event-id",
                          "Last-Event-ID must be `<sid>.<position>` or a position") from None
    query_sid = request.args.get("sid")
    if query_sid and not sid:
        if len(query_sid) > 32 or not all(c in SID_ALPHABET for c in query_sid):
            raise Problem(400, "invalid-parameter", "bad `sid`", field="sid")
        sid = query_sid
    missing = svc.hub.missing_streams(streams)
    if missing:
        raise Problem(404, "unknown-stream", f"stream `{sorted(missing)[0]}` does not exist",
                      stream=sorted(missing)[0])
    return Checked(streams, resume, sid, principal.subject, key)


def catch_up(svc: Any, checked: Checked, after: int, upto: int) -> Iterator[list]:
    """Pages of committed events of the streams in (after, upto], read in this greenlet.

    Runs inside streaming generators, outside Flask's app context: the services are passed in.
    """
    page = svc.settings.catchup_page
    while after < upto:
        with svc.pool.connection() as conn:
            rows = svc.store.read_events(conn, after=after, upto=upto, limit=page,
                                         streams=checked.streams)
        if not rows:
            return
        yield rows
        after = rows[-1].id
        if len(rows) < page:
            return
        gevent.sleep(0)  # let live delivery to other clients run between pages


def _client_socket() -> Any:
    return request.environ.get("sluice.socket") or request.environ.get("gunicorn.sock")


def _shutdown(sock: Any) -> None:
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
        self.io = gevent.get_hub().loop.io(sock.fileno(), 1)  # 1 = readable
        self.io.start(self._readable)

    def _readable(self) -> None:
        try:
            if self.raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                self.stop()  # the client sent bytes: not an EventSource; nothing to close
                return
        except BlockingIOError:
            return           # woken for nothing: keep watching
        except OSError:
            pass
        self.stop()
        self.sub.close()

    def stop(self) -> None:
        if self.io is not None:
            self.io.stop()
            self.io.close()
            self.io = None


@bp.get("/api/v1/sse")
def sse() -> Response:
    svc = services()
    settings = svc.settings
    if svc.draining:
        return _retry_only(settings.retry_max_ms)
    if svc.hub.subscriber_count() >= settings.max_stream_connections:
        svc.metrics.shed.labels("sse").inc()
        return _retry_only(_shed_retry_ms(svc))
    try:
        checked = check_subscribe()
    except (DatabaseUnavailable, OriginUnavailable):
        # A 5xx would stop EventSource for good: tell it to come back instead.
        return _retry_only(svc.backoff.retry_ms(4))
    sid = checked.sid or new_sid()
    connects, retry = svc.backoff.connect(sid)
    if checked.sid and connects > settings.max_reconnects:
        svc.metrics.limited.labels("reconnects").inc()
        raise Problem(429, "reconnecting-too-fast", f"connection `{sid}` reconnected {connects} "
                      f"times within {settings.retry_window_s} s, ignoring `retry:`",
                      headers={"Retry-After": str(settings.retry_window_s)},
                      limit=settings.max_reconnects)
    release = svc.limits.acquire(checked.token_key, request.remote_addr, "sse")
    request.environ["sluice.sid"] = sid  # for the request log line
    svc.metrics.retry_ms.observe(retry)
    opened_at = time.monotonic()
    sub, seam = svc.hub.subscribe(checked.streams, settings.subscriber_queue_max)
    takeover = checked.sid is not None  # a reconnect: an older connection with this id loses
    svc.presence.join(sub, sid, checked.subject, takeover=takeover)
    ended = False

    def end() -> None:
        """Leave the hub, the limits and presence, once (from the stream, or at close)."""
        nonlocal ended
        if ended:
            return
        ended = True
        svc.presence.leave(sub, sid, checked.subject, takeover=takeover)  # recorded first
        svc.hub.unsubscribe(sub)
        release()

    start = seam if checked.resume is None else checked.resume
    hello = request.args.get("hello") == "1"
    sub.envelope = request.args.get("envelope") == "1"
    environ = request.environ
    sock = _client_socket()
    watcher = None
    if sock is not None:
        sub.on_stuck = lambda: _shutdown(sock)  # the hub's ticker ends a write stuck too long
        watcher = DisconnectWatch(sock, sub)

    def write(data: bytes) -> Iterator[bytes]:
        """Yield one chunk to pywsgi, stamped so the hub's ticker can see a stuck write."""
        sub.writing_since = time.monotonic()
        yield data
        sub.writing_since = 0.0
        sub.active_at = time.monotonic()

    def write_unsent(data: bytes) -> bool:
        """Finish a chunk the hub's direct write left half sent (raw bytes, framed already)."""
        sub.writing_since = time.monotonic()
        try:
            sock.sendall(data)
        except OSError:
            return False
        finally:
            sub.writing_since = 0.0
        sub.active_at = time.monotonic()
        return True

    def stream() -> Iterator[bytes]:
        sub.last = start
        try:
            preamble = framing.preamble(retry, f"{sid}.{format_position(start)}")
            if hello:  # opt-in: a visible first event, so a client can tell its stream works
                preamble += framing.body("hello", orjson.dumps({"sid": sid}).decode())
            yield from write(preamble)
            try:
                for rows in catch_up(svc, checked, start, seam):
                    if sub.closed and not sub.overflowed:
                        return
                    if sub.envelope:
                        yield from write(b"".join(
                            framing.with_id(f"{sid}.{row.id}", envelope_body(row.type, row.data))
                            for row in rows))
                    else:
                        yield from write(b"".join(
                            framing.encode(f"{sid}.{row.id}", row.type, row.data)
                            for row in rows))
                    sub.last = rows[-1].id
            except DatabaseUnavailable:
                yield framing.retry_only(svc.backoff.retry_ms(2))
                return
            sub.last = max(sub.last, seam)
            sink = direct_sink(sub, environ, sid)  # headers are out: the hub may write directly
            while True:
                if sink is not None and sub.queue.empty() and not sub.closed:
                    sub.sink = sink   # idle: the hub writes the next delivery itself
                item = sub.queue.get()  # the hub's ticker queues heartbeats: no timer here
                sub.sink = None
                if isinstance(item, Unsent):
                    if not write_unsent(item.data) or (sub.closed and sub.queue.empty()):
                        break
                    continue
                items = [item]
                while not sub.queue.empty() and len(items) < 64:
                    items.append(sub.queue.get_nowait())  # coalesce what is waiting: one write
                out: list[bytes] = []
                ended = None
                for item in items:
                    if item is None:
                        ended = "closed"
                        break
                    if item is HEARTBEAT:
                        out.append(framing.heartbeat())
                        continue
                    if isinstance(item, StreamEnded):
                        ended = item
                        break
                    for e in item:
                        if e.position > sub.last:
                            out.append(framing.with_id(f"{sid}.{e.position}",
                                                       e.envelope() if sub.envelope else e.body))
                            sub.last = e.position
                if isinstance(ended, StreamEnded):
                    # Deleted: say so and end; the reconnect gets 404 and EventSource stops.
                    out.append(framing.end(orjson.dumps({"stream": ended.stream}).decode()))
                    yield from write(b"".join(out))
                    return
                if out:
                    yield from write(b"".join(out))
                if ended or (sub.closed and sub.queue.empty()):
                    break
            # Cut loose (queue full), the server is stopping, or the client left: tell it when
            # to come back; Last-Event-ID resumes it from `last` with nothing missed.
            yield framing.retry_only(retry)
        finally:
            sub.sink = None
            if time.monotonic() - opened_at >= settings.retry_reset_after_s \
                    and not sub.overflowed:
                svc.backoff.healthy(sid)  # it stayed up: its next reconnect starts short again
            end()
            if watcher is not None:
                watcher.stop()

    response = Response(stream(), status=200, mimetype=framing.content_type,
                        headers=SSE_HEADERS, direct_passthrough=True)
    response.call_on_close(end)  # also when the stream never started
    return response


def _shed_retry_ms(svc: Any) -> int:
    """At the connection limit: a growing retry for a known sid, a jittered one otherwise, so
    shed clients do not all come back at the same moment."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("lastEventId") or ""
    try:
        sid, _ = parse_last_event_id(raw)
    except ValueError:
        sid = None
    sid = sid or request.args.get("sid")
    if sid and len(sid) <= 32 and all(c in SID_ALPHABET for c in sid):
        return svc.backoff.connect(sid)[1]
    return svc.backoff.jittered_ms(4)


def _retry_only(retry_ms: int) -> Response:
    return Response(framing.retry_only(retry_ms), status=200, mimetype=framing.content_type,
                    headers=SSE_HEADERS)


@bp.get("/api/v1/poll")
def poll() -> Response:
    svc = services()
    settings = svc.settings
    if svc.draining:
        raise Problem(503, "shutting-down", "the server is restarting", headers={"Retry-After": "2"})
    raw_timeout = request.args.get("timeout", str(int(settings.longpoll_max_s)))
    try:
        hold = float(raw_timeout)
    except ValueError:
        raise Problem(400, "invalid-parameter", "`timeout` must be seconds", field="timeout") from None
    if not 0 <= hold <= 3600:
        raise Problem(400, "invalid-parameter", "`timeout` must be 0 to 3600 seconds",
                      field="timeout")
    hold = min(hold, settings.longpoll_max_s)
    if svc.hub.subscriber_count() >= settings.max_stream_connections:
        svc.metrics.shed.labels("poll").inc()
        raise Problem(503, "overloaded", "this server holds as many connections as it may",
                      headers={"Retry-After": str(max(1, svc.backoff.jittered_ms(4) // 1000))})
    try:
        checked = check_subscribe()
    except OriginUnavailable:
        raise Problem(503, "origin-unavailable", "the origin did not authorize this subscription "
                      "in time; try again", headers={"Retry-After": "2"}) from None
    retry_after, refused = 0, False
    if checked.sid:  # each answer hands out a sid; a client that passes it back is paced by it
        retry_after, refused = svc.backoff.poll(checked.sid, settings.longpoll_max_rate)
    if refused:
        raise Problem(429, "polling-too-fast", "this client polls far faster than allowed; "
                      "wait for Retry-After", headers={"Retry-After": str(retry_after)},
                      limit_per_s=settings.longpoll_max_rate)
    page = settings.catchup_page
    release = svc.limits.acquire(checked.token_key, request.remote_addr, "poll")
    sid = checked.sid or new_sid()
    sub, seam = svc.hub.subscribe(checked.streams, settings.subscriber_queue_max)
    svc.presence.join(sub, sid, checked.subject, takeover=False)
    try:
        start = checked.resume
        if start is None:
            # "Newer than now" means newer than the last commit, which the hub may not have
            # heard of yet (a client that just published must not get its own event back).
            with svc.pool.connection() as conn:
                start = max(seam, svc.store.last_position(conn))
        cursor = max(start, seam)
        events: list[dict] = []
        for rows in catch_up(svc, checked, start, seam):
            events = [_poll_event(r.id, r.stream, r.type, r.data) for r in rows]
            if len(rows) == page:
                cursor = rows[-1].id  # more history to come: continue from here
            break
        if not events and hold > 0:
            with gevent.Timeout(hold, False):
                while not events:
                    item = sub.queue.get()
                    if item is None or isinstance(item, StreamEnded):
                        break  # closed or deleted: answer with what there is
                    if item is not HEARTBEAT:  # heartbeats mean nothing to a poll: keep waiting
                        for e in item:
                            if e.position > cursor and len(events) < page:
                                events.append(_poll_event(e.position, e.stream, e.type, e.data))
                                cursor = e.position
    finally:
        svc.hub.unsubscribe(sub)
        release()
        svc.presence.leave(sub, sid, checked.subject, takeover=False)
    response = json_response({"events": events, "cursor": format_position(cursor),
                              "sid": sid})
    if retry_after:
        response.headers["Retry-After"] = str(retry_after)  # answered, but slow down
    return response


def _poll_event(position: int, stream: str, event_type: str, data: str) -> dict:
    return {"id": format_position(position), "stream": stream, "type": event_type,
            "data": orjson.Fragment(data)}
