"""One JSON line per request on stdout (Heroku's log router collects it).

Fields: time, method, path, route (the matched rule), status, ms, ip, pid, and for streams the
connection id (`sid`). Written when the response is closed, so a stream's line carries how long
it was held. Never logged: query strings (they may hold `?token=`), headers, cookies, bodies.
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import sys
import time
from functools import partial
from typing import Any, TextIO

import orjson
from flask import Flask, Response, request
from gevent import get_hub

from common.clock import PerSecond
from streaming.connection import PARKED_KEY

START_KEY = "sluice.started"
SID_KEY = "sluice.sid"  # streams put their connection id here for the log line


def write_line(
    fields: dict[str, Any], started: float, sid: str | None = None, out: TextIO | None = None
) -> None:
    """Write one request's line: `fields` with the time, the duration and a stream's sid."""
    line = {"time": utc_now_ms(), **fields, "ms": round((time.monotonic() - started) * 1000, 2)}
    if sid:
        line["sid"] = sid
    if out is not None:
        try:
            out.write(orjson.dumps(line).decode() + "\n")
        except (OSError, ValueError):  # closed: nothing to do
            pass
        return
    STDOUT.add(orjson.dumps(line) + b"\n")


_UTC_SECOND = PerSecond(lambda whole: dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))


def utc_now_ms() -> str:
    """ISO 8601 UTC with milliseconds, as `datetime.isoformat(timespec="milliseconds")` writes
    it: the date and time are formatted once a second, the milliseconds each call."""
    now = time.time()
    return f"{_UTC_SECOND(now)}.{int((now - int(now)) * 1000):03d}+00:00"


class LineBuffer:
    """Lines held for one write: flushed `FLUSH_S` after the first line waits, at once past
    `MAX_BYTES`, and at exit. At thousands of requests a second, a write per line (or per turn
    of the event loop, which under load is about one request) cost more than the line itself;
    a line now waits `FLUSH_S` at most, and a kill -9 loses what waits. Used from the process's
    event loop only."""

    FLUSH_S = 0.05
    MAX_BYTES = 65536

    def __init__(self, write: Any) -> None:
        self._write = write  # () -> the binary file to write to, looked up per flush
        self._lines: list[bytes] = []
        self._bytes = 0
        self._timer: Any = None

    def add(self, line: bytes) -> None:
        self._lines.append(line)
        self._bytes += len(line)
        if self._bytes >= self.MAX_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = get_hub().loop.timer(self.FLUSH_S)
            self._timer.start(self.flush)

    def flush(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._bytes = 0
        try:
            sys.stdout.flush()  # whatever was printed before these lines goes first
            out = self._write()
            out.write(data)
            out.flush()
        except (OSError, ValueError, AttributeError):  # stdout closed or replaced: drop them
            pass


STDOUT = LineBuffer(lambda: sys.stdout.buffer)
atexit.register(STDOUT.flush)


def install_request_log(app: Flask, out: TextIO | None = None) -> None:
    pid = os.getpid()

    @app.before_request
    def _start() -> None:
        request.environ[START_KEY] = time.monotonic()

    @app.after_request
    def _log(response: Response) -> Response:
        environ = request.environ
        rule = request.url_rule
        fields: dict[str, Any] = {
            "method": request.method,
            "path": request.path[:500],
            "route": rule.rule if rule else None,
            "status": response.status_code,
            "ip": request.remote_addr,
            "pid": pid,
        }
        started = environ.get(START_KEY, time.monotonic())

        def closed() -> None:
            sid = environ.get(SID_KEY)
            line = partial(write_line, fields, started, sid, out)
            parked = environ.get(PARKED_KEY)
            if parked is not None:  # a held stream took its socket over: log at its real end
                parked.at_end(line)
            else:
                line()

        response.call_on_close(closed)
        return response
