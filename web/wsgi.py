"""Sluice's pywsgi handler: gevent's WSGIHandler with four changes that matter at 2,000 req/s,
and a fifth that matters at 10,000 held streams.

1. TCP_NODELAY on every connection: without it a response waits for the client's delayed ACK
   (measured: 68 ms instead of 23 ms per sequential request with a 20 ms batch wait).
2. A lean request-header parser in place of the stdlib `email` machinery pywsgi uses (12
   `email.message.get` calls and a feedparser pass per request were its largest non-I/O cost),
   with limits: at most 100 headers, at most `MAX_HEADER_BYTES` in all (32 KiB by default; a
   line can never be longer than that). It reads framing as RFC 9112 does and refuses what two
   readers could read two ways (`400` with `Connection: close`): a header name that is not a
   token (whitespace before the colon), obs-fold, `Content-Length` that is not plain digits or
   repeats with another value, `Transfer-Encoding` other than one `chunked`, and both. So
   pywsgi, which decides framing from what this parser hands it, reads one body, one way.
3. No access-log formatting (pywsgi formats a line per request even with log=None).
4. A deadline on the request line and headers (`HEADER_TIMEOUT_S`): a client that sends them a
   byte at a time (slowloris), or a keep-alive connection left idle, is closed instead of
   holding a greenlet forever. pywsgi alone waits as long as the client likes.
5. One `send` for the headers and a first body chunk of up to 64 KiB (`OneSend`): pywsgi makes
   two, and a small answer (an ingest acknowledgement, a long-poll page) then costs two
   syscalls and, with TCP_NODELAY, two packets. Every write tries one plain non-blocking `send`
   before gevent's `sendall`, which costs a `getsockopt` per call; the `Date` header is
   formatted once a second.
6. Parking (`Parking.park`): an event stream whose headers are out may take its socket over, so
   the handler, its greenlet, the request environ and the framework's objects are all freed
   while the stream waits (streaming/connection.py writes the rest of the response).

The same handler serves `python app.py` and gunicorn's workers (`SluiceGunicornWorker`).
"""

from __future__ import annotations

import _socket
import os
import re
import socket
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

import gevent
import gevent.event
from gevent import pywsgi
from gevent.pywsgi import WSGIHandler

from common.clock import PerSecond

if TYPE_CHECKING:  # gunicorn's master imports this module before its workers patch: no stack
    from runtime.services import Services

MAX_LINE = 65536
MAX_HEADERS = 100
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name
_DIGITS = re.compile(r"[0-9]+")
_FRAMING = ("content-length", "transfer-encoding")
MAX_HEADER_BYTES = 32768
READ_BUFFER = 1024


def _framing_problem(framing: list[tuple[str, str]]) -> str:
    """Why these Content-Length / Transfer-Encoding values frame the body ambiguously ("" if
    they do not): exactly one reading, or a 400."""
    lengths = {v for k, v in framing if k == "content-length"}
    codings = [v for k, v in framing if k == "transfer-encoding"]
    if codings:
        if lengths:
            return "Both Content-Length and Transfer-Encoding"
        if len(codings) > 1 or codings[0].lower() != "chunked":
            return "Transfer-Encoding other than one chunked"
        return ""
    values = {part.strip() for v in lengths for part in v.split(",")}
    if len(values) != 1:
        return "Content-Length values differ"
    (value,) = values
    if not _DIGITS.fullmatch(value) or len(value) > 18:
        return "Content-Length is not plain digits"
    return ""


class RequestHeaders:
    """Request headers as pywsgi consumes them (`status`, `get`, `headers`, `typeheader`)."""

    __slots__ = ("status", "_lines", "_index")

    def __init__(self, fp: BinaryIO, max_bytes: int = MAX_HEADER_BYTES) -> None:
        self.status = ""
        self._lines: list[str] = []  # raw "Name: value\r\n" lines
        self._index: dict[str, str] = {}  # lower-cased name -> first value
        framing: list[tuple[str, str]] = []  # every Content-Length / Transfer-Encoding value
        self._read(fp, max_bytes, framing)
        if framing and not self.status:
            self.status = _framing_problem(framing)
            if not self.status and "content-length" in self._index:  # `10, 10` reads as `10`
                self._index["content-length"] = self._index["content-length"].split(",")[0].strip()

    def _read(self, fp: BinaryIO, max_bytes: int, framing: list[tuple[str, str]]) -> None:
        left = max_bytes
        while True:
            line = fp.readline(min(MAX_LINE, left) + 1)
            left -= len(line)
            if len(line) > MAX_LINE or left < 0:
                self.status = "Headers too large"
                return
            if line in (b"\r\n", b"\n", b""):
                return
            if len(self._lines) >= MAX_HEADERS:
                self.status = "Too many headers"
                return
            text = line.decode("iso-8859-1")
            self._lines.append(text)
            name, sep, value = text.partition(":")
            if not sep or not _TOKEN.fullmatch(name):  # obs-fold and `Name :` land here too
                self.status = "Malformed header line"
                return
            key, value = name.lower(), value.strip()
            if "\r" in value or "\x00" in value:  # RFC 9110: never in a field value
                self.status = "Malformed header value"
                return
            if key in _FRAMING:
                framing.append((key, value))
            if key not in self._index:
                self._index[key] = value  # the first of a repeated header (but framing's) counts
            elif key == "host":
                self.status = "Host repeated"
                return

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._index.get(name.lower(), default)

    getheader = get

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._index

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        self._index.pop(key, None)
        self._lines = [
            line for line in self._lines if line[:1] in " \t" or line.partition(":")[0].strip().lower() != key
        ]

    def items(self) -> list[tuple[str, str]]:
        """(name, value) pairs in arrival order (gunicorn's access log reads these)."""
        pairs: list[tuple[str, str]] = []
        for line in self._lines:
            if line[:1] in " \t" and pairs:
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + " " + line.strip())
            else:
                name, _, value = line.partition(":")
                pairs.append((name.strip(), value.strip()))
        return pairs

    def forget_lines(self) -> None:
        """Drop the raw lines once the environ holds them (`get` keeps working)."""
        self._lines = []

    @property
    def headers(self) -> Iterator[str]:
        return iter(self._lines)

    @property
    def typeheader(self) -> str | None:
        return self._index.get("content-type")


IDLE: weakref.WeakSet[Any] = weakref.WeakSet()  # handlers waiting for a request line


def close_idle() -> int:
    """Close keep-alive connections that wait for their next request (on shutdown: a draining
    worker need not wait for them to time out). Returns how many were closed."""
    closed = 0
    for handler in list(IDLE):
        sock = getattr(handler, "socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                closed += 1
            except OSError:
                pass
    return closed


class HeaderTimeout(socket.timeout):
    """The request line and headers did not arrive in time (pywsgi closes on socket errors)."""


def body_unread(body: Any) -> bool:
    """Has the request body (pywsgi's Input) bytes the application has not read?"""
    if body is None:
        return False
    return (
        bool(body.chunk_length != 0)
        if body.chunked_input
        else bool(body.position < (body.content_length or 0))
    )


class HeaderDeadline:
    """Mixin for pywsgi handlers: the request line and headers must arrive within
    `header_timeout_s` of the handler starting to wait for them."""

    header_timeout_s = 10.0
    max_header_bytes = MAX_HEADER_BYTES
    max_request_line = 8192
    _deadline: gevent.Timeout | None = None

    def handle_one_request(self) -> Any:  # pywsgi's
        self._deadline = gevent.Timeout.start_new(
            self.header_timeout_s, HeaderTimeout("request headers too slow")
        )
        try:
            return super().handle_one_request()  # type: ignore[misc]
        finally:
            self._deadline.cancel()

    def read_requestline(self) -> str:
        """Wait for the next request line, known as idle meanwhile (see `close_idle`); a line
        over `max_request_line` bytes gets pywsgi's 414."""
        IDLE.add(self)
        try:
            line = self.rfile.readline(self.max_request_line + 1)  # type: ignore[attr-defined]
        finally:
            IDLE.discard(self)
        if len(line) > self.max_request_line:
            return "x" * pywsgi.MAX_REQUEST_LINE  # pywsgi answers 414 to a line this long
        return line.decode("latin-1")

    def read_request(self, raw_requestline: str) -> Any:  # pywsgi's
        try:
            return super().read_request(raw_requestline)  # type: ignore[misc]
        finally:
            if self._deadline is not None:
                self._deadline.cancel()  # headers are in: the application has no deadline here

    def run_application(self) -> Any:  # pywsgi's
        """A body the application left unread is not drained (pywsgi reads it to the end, with
        no deadline: a client that trickles it, or never sends it, would hold the connection):
        the connection closes after the answer instead. A body the application reads has its
        own deadline (`BODY_TIMEOUT_S`, web/http.py)."""
        try:
            return super().run_application()  # type: ignore[misc]
        finally:
            body = getattr(self, "wsgi_input", None)
            if body is not None and body_unread(body):
                self.close_connection = True
                body.chunked_input = False  # so pywsgi's discard finds nothing left to read
                body.content_length = body.position


_HTTP_DATE = PerSecond(pywsgi.format_date_time)


def http_date() -> bytes:
    """Now as an HTTP `Date` value (RFC 9110's IMF-fixdate), formatted once a second."""
    return _HTTP_DATE(time.time())


class OneSend:
    """Mixin for pywsgi handlers: the status line, the headers and the first body chunk (up to
    `ONE_SEND_MAX` bytes) in one `send`. Larger first chunks keep pywsgi's two writes, which
    spare copying them."""

    ONE_SEND_MAX = 65536
    headers_sent: bool  # pywsgi's state, which this method keeps as pywsgi's does
    response_use_chunked: bool
    status: bytes  # latin-1 bytes, as start_response stored them
    response_headers: list[tuple[bytes, bytes]]
    socket: Any
    code: int
    response_length: int
    provided_date: str | None
    close_connection: bool

    def _write_with_headers(self, data: bytes) -> None:  # pywsgi's
        if len(data) > self.ONE_SEND_MAX:
            super()._write_with_headers(data)  # type: ignore[misc]
            return
        self.headers_sent = True
        self.finalize_headers()
        out = bytearray(b"HTTP/1.1 ")
        out += self.status
        out += b"\r\n"
        for name, value in self.response_headers:
            out += name
            out += b": "
            out += value
            out += b"\r\n"
        out += b"\r\n"
        if data:
            if self.response_use_chunked:
                out += b"%x\r\n" % len(data)
                out += data
                out += b"\r\n"
            else:
                out += data
        self._sendall(out)

    def finalize_headers(self) -> None:  # pywsgi's
        """pywsgi's, with the `Date` header formatted once a second instead of per response."""
        if self.provided_date is None:
            self.response_headers.append((b"Date", http_date()))
            self.provided_date = "set"
        if body_unread(getattr(self, "wsgi_input", None)) and not self.close_connection:
            # answered before its body was read: the connection closes after this answer (the
            # body is not drained), and says so, so that no client reuses it
            self.close_connection = True
            self.response_headers.append((b"Connection", b"close"))
        super().finalize_headers()  # type: ignore[misc]

    def _sendall(self, data: bytes | bytearray) -> None:  # pywsgi's
        """One non-blocking `send` first, the cooperative `sendall` only for what it did not
        take. gevent's `sendall` asks the kernel for the socket's send buffer size
        (`getsockopt`) on every call, which for a small answer is a second system call."""
        sock = self.socket
        raw = getattr(sock, "_sock", None)
        try:
            sent = 0
            if raw is not None and type(sock).__module__ == "gevent._socket3":
                try:
                    sent = raw.send(data)
                except BlockingIOError:
                    sent = 0
            if sent < len(data):
                sock.sendall(memoryview(data)[sent:] if sent else data)
        except OSError as ex:  # as pywsgi's: the status names the error, the code turns negative
            self.status = f"socket error: {ex}"  # type: ignore[assignment]  # a str, as pywsgi
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)


class Parking:
    """Mixin for pywsgi handlers: the application may take over a response's socket.

    A held event stream spends almost all its life waiting. Under pywsgi that wait keeps the
    handler greenlet (its saved stack and frames), the handler, the environ, the request
    headers and the read buffer alive: ~20 KB per idle stream. `park()` hands the application
    its own descriptor for the connection (a `dup`) and tells pywsgi that the response is
    finished without its last chunk and that the connection is not to be reused; the handler
    then returns and closes its descriptor, and everything it held goes. The application
    writes the rest of the response (chunk-framed if `chunked`) and closes its socket.
    """

    def park(self) -> tuple[Any, bool] | None:
        """(a non-blocking socket of this connection, whether the response is chunked), or None
        if this connection cannot be taken over (TLS, headers not sent, a blocking socket)."""
        sock: Any = getattr(self, "socket", None)
        raw = getattr(sock, "_sock", None)
        if (
            raw is None
            or type(sock).__module__ != "gevent._socket3"
            or not getattr(self, "headers_sent", False)
            or raw.gettimeout() != 0.0
        ):
            return None
        own = _socket.socket(fileno=os.dup(raw.fileno()))
        own.setblocking(False)
        chunked = bool(getattr(self, "response_use_chunked", False))
        self.response_use_chunked = False  # pywsgi must not end the response: its owner will
        self.close_connection = True  # nor read another request from this connection
        return own, chunked


class SluiceHandler(OneSend, Parking, HeaderDeadline, WSGIHandler):
    """pywsgi's handler with TCP_NODELAY, the lean header parser, no access-log work, and the
    client socket in the environ (gunicorn's handler puts it under `gunicorn.sock`)."""

    def __init__(self, sock: Any, address: Any, server: Any, rfile: Any = None) -> None:
        # A 1 KiB read buffer instead of 8 KiB: it lives as long as the connection, and a held
        # SSE connection never reads again. Request lines still go up to MAX_LINE (readline
        # refills), and large bodies are read past the buffer.
        super().__init__(sock, address, server, rfile or sock.makefile("rb", READ_BUFFER))

    def MessageClass(self, fp: BinaryIO, *args: object) -> RequestHeaders:
        return RequestHeaders(fp, self.max_header_bytes)

    def get_environ(self) -> dict:
        env = super().get_environ()
        env["sluice.socket"] = self.socket  # streams watch it to notice a client going away
        env["sluice.handler"] = self  # a held stream parks its socket (`park`)
        if isinstance(self.headers, RequestHeaders):
            self.headers.forget_lines()  # in the environ now; a held stream keeps less
        return env

    def handle(self) -> None:
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a Unix socket): nothing to do
            pass
        super().handle()

    def log_request(self) -> None:
        pass


def gunicorn_worker_class() -> type:
    """gunicorn's gevent pywsgi worker using the same header parser (gunicorn keeps its own
    access logging and already sets TCP_NODELAY on its listener)."""
    from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

    from config.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError:  # the worker's app factory reports it
        settings = Settings()

    class Handler(OneSend, Parking, HeaderDeadline, PyWSGIHandler):
        def MessageClass(self, fp: BinaryIO, *args: object) -> RequestHeaders:
            return RequestHeaders(fp, self.max_header_bytes)

        def get_environ(self) -> dict:
            env = super().get_environ()
            env["sluice.handler"] = self  # a held stream parks its socket (`park`)
            return env

    Handler.header_timeout_s = settings.header_timeout_s
    Handler.max_header_bytes = settings.max_header_bytes
    Handler.max_request_line = settings.max_request_line

    class SluiceGunicornWorker(GeventPyWSGIWorker):
        wsgi_handler = Handler

        def handle_exit(self, sig: int, frame: Any) -> None:
            """On SIGTERM, drain at once (streams get `retry:`, the batcher flushes) instead of
            at worker exit: gunicorn waits for idle keep-alive connections up to its graceful
            timeout and may then kill the worker before any exit hook runs."""
            super().handle_exit(sig, frame)
            services = getattr(getattr(self, "wsgi", None), "extensions", {}).get("sluice")
            if services is not None:
                gevent.spawn(drain_worker, self, services)

    return SluiceGunicornWorker


def drain(services: Services) -> bool | None:
    """The one drain sequence (SIGTERM under `python app.py` and under gunicorn): close idle
    keep-alive connections, end streams with `retry:`, flush the batcher, close idle ones again.
    Returns whether the batcher flushed, or None if the services were already draining."""
    if services.draining:
        return None
    close_idle()  # idle keep-alive connections: nothing to wait for
    flushed = services.close(services.settings.shutdown_timeout_s)
    close_idle()  # and those that finished a request meanwhile
    return flushed


_DRAINS: dict[int, gevent.event.Event] = {}  # id(services) -> set once its drain finished


def drain_worker(worker: Any, services: Services) -> None:
    """Drain a gunicorn worker's services once and log whether its batcher flushed. Called on
    SIGTERM and again at worker exit: the second call waits for the first to finish, so the
    worker never exits halfway through its drain."""
    running = _DRAINS.get(id(services))
    if running is not None:
        running.wait(services.settings.shutdown_timeout_s)
        return
    done = _DRAINS[id(services)] = gevent.event.Event()
    try:
        flushed = drain(services)
        if flushed is not None:
            worker.log.info("worker %s: batcher %s", worker.pid, "flushed" if flushed else "NOT flushed")
    finally:
        done.set()
