"""An SSE client for tests: follows the WHATWG event-stream interpretation steps, incrementally,
and records everything a browser would act on (events, `retry`, `id`, comments, the end)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import gevent
from gevent.queue import Queue


@dataclass
class Parser:
    """Feed bytes; collect (kind, ...) items: ("event", id, type, data), ("retry", ms),
    ("comment",). `last_id` is what EventSource would send as Last-Event-ID."""

    items: list = field(default_factory=list)
    last_id: str = ""
    retry: int | None = None
    _buf: str = ""
    _data: list = field(default_factory=list)
    _type: str = ""

    def feed(self, chunk: bytes) -> list:
        self._buf += chunk.decode("utf-8")
        out = []
        while True:
            cut = min((i for i in (self._buf.find("\r"), self._buf.find("\n")) if i >= 0), default=-1)
            if cut < 0 or (self._buf[cut] == "\r" and cut + 1 == len(self._buf)):
                break  # no complete line yet (a lone CR may be half of CRLF)
            line = self._buf[:cut]
            step = 2 if self._buf[cut : cut + 2] == "\r\n" else 1
            self._buf = self._buf[cut + step :]
            out += self._line(line)
        self.items += out
        return out

    def _line(self, line: str) -> list:
        if line == "":
            if not self._data:
                self._type = ""
                return []
            item = ("event", self.last_id, self._type or "message", "\n".join(self._data))
            self._data, self._type = [], ""
            return [item]
        if line.startswith(":"):
            return [("comment",)]
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\x00" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
            return [("retry", int(value))]
        return []


def parse_event_stream(raw: bytes):
    """Parse a whole stream: (events as (id, type, data), last id, retry)."""
    p = Parser()
    p.feed(raw + b"\n" if not raw.endswith(b"\n") else raw)
    return [i[1:] for i in p.items if i[0] == "event"], p.last_id, p.retry


class Response:
    """Status and headers of a raw-socket response."""

    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.headers = headers


class Stream:
    """A live SSE connection over a raw socket (no client-side buffering), read by a greenlet;
    parsed items arrive on `queue`, and ("end",) when the server closes."""

    def __init__(
        self,
        url: str,
        headers: dict | None = None,
        params=None,
        cookies=None,
        recv_delay: float = 0.0,
        recv_size: int = 65536,
    ) -> None:
        parts = urlsplit(url)
        query = urlencode(params or {}, doseq=True)
        target = parts.path + ("?" + query if query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if cookies:
            lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items()))
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buf = b""
        self.recv_delay = recv_delay  # a slow reader: sleep this long after each recv
        self.recv_size = recv_size
        head = self._until(b"\r\n\r\n").decode("iso-8859-1").split("\r\n")
        self.response = Response(
            int(head[0].split()[1]),
            {k.strip(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])},
        )
        self.parser = Parser()
        self.queue: Queue = Queue()
        self.reader = gevent.spawn(self._read)

    def _recv(self) -> bytes:
        chunk = self.sock.recv(self.recv_size)
        if self.recv_delay:
            gevent.sleep(self.recv_delay)
        return chunk

    def _until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            chunk = self._recv()
            if not chunk:
                raise EOFError("connection closed")
            self._buf += chunk
        out, _, self._buf = self._buf.partition(marker)
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._recv()
            if not chunk:
                raise EOFError("connection closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read(self) -> None:
        try:
            chunked = self.response.headers.get("Transfer-Encoding", "").lower() == "chunked"
            length = self.response.headers.get("Content-Length")
            if length is not None and not chunked:  # a whole body (e.g. `retry:` only): parse it
                for item in self.parser.feed(self._exactly(int(length))):
                    self.queue.put(item)
                raise EOFError("body complete")
            while True:
                if chunked:
                    size = int(self._until(b"\r\n").split(b";")[0], 16)
                    if size == 0:
                        break
                    data = self._exactly(size)
                    self._exactly(2)
                else:
                    data = self._buf or self._recv()
                    self._buf = b""
                    if not data:
                        break
                for item in self.parser.feed(data):
                    self.queue.put(item)
        except (OSError, EOFError, ValueError):
            pass
        self.queue.put(("end",))

    def next(self, kinds=("event",), timeout: float = 15):
        """The next item whose kind is in `kinds` (or ("end",)), skipping others."""
        with gevent.Timeout(timeout):
            while True:
                item = self.queue.get()
                if item[0] in kinds or item[0] == "end":
                    return item

    def events(self, n: int, timeout: float = 15) -> list:
        got = []
        with gevent.Timeout(timeout):
            while len(got) < n:
                item = self.next()
                assert item[0] != "end", f"stream ended after {len(got)} of {n} events"
                got.append(item[1:])
        return got

    def close(self) -> None:
        self.reader.kill(block=False)
        self.sock.close()
