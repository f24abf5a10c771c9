"""One JSON line per request on stdout (Heroku's log router collects it).

Fields: time, method, path, route (the matched rule), status, ms, ip, pid, and for streams the
connection id (`sid`). Written when the response is closed, so a stream's line carries how long
it was held. Never logged: query strings (they may hold `?token=`), headers, cookies, bodies.
"""
from __future__ import annotations

import datetime as dt
import os
import sys
import time
from functools import partial
from typing import Any, TextIO

import orjson
from flask import Flask, Response, request
from gevent import get_hub

from streaming.connection import PARKED_KEY

START_KEY = "sluice.started"
SID_KEY = "sluice.sid"  # streams put their connection id here for the log line


def write_line(fields: dict[str, Any], started: float, sid: str | None = None,
               out: TextIO | None = None) -> None:
    """Write one request's line: `fields` with the time, the duration and a stream's sid."""
    line = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            **fields, "ms": round((time.monotonic() - started) * 1000, 2)}
    if sid:
        line["sid"] = sid
    stream = out or sys.stdout
    try:
        stream.write(orjson.dumps(line).decode() + "\n")
    except (OSError, ValueError):  # stdout closed: nothing to do
        return
    if stream not in _flush_due:  # one flush (one write) for every line of this loop turn
        _flush_due.add(stream)
        get_hub().loop.run_callback(_flush, stream)


# Streams with a flush scheduled. Lines are written at the end of the event loop's current
# turn, not one write each: at thousands of requests a second a write per line cost ~10 us
# of each answer. A line waits microseconds at most, and reaches the log before the next
# turn (a kill -9 loses only the lines of the turn it interrupts).
_flush_due: set[TextIO] = set()


def _flush(stream: TextIO) -> None:
    _flush_due.discard(stream)
    try:
        stream.flush()
    except (OSError, ValueError):
        pass


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
            "method": request.method, "path": request.path[:500],
            "route": rule.rule if rule else None, "status": response.status_code,
            "ip": request.remote_addr, "pid": pid,
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
