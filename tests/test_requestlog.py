"""The request log's line buffer: lines reach the file together, in order, within FLUSH_S."""

from __future__ import annotations

import datetime as dt
import io
import re

import gevent

from web.requestlog import LineBuffer, utc_now_ms


class Sink(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


def test_lines_wait_for_one_write_and_keep_their_order():
    sink = Sink()
    buf = LineBuffer(lambda: sink)
    for i in range(50):
        buf.add(b'{"n":%d}\n' % i)
    assert sink.writes == 0  # nothing written yet: the lines wait for the timer
    gevent.sleep(buf.FLUSH_S * 4)
    assert sink.writes == 1
    assert sink.getvalue().splitlines() == [b'{"n":%d}' % i for i in range(50)]
    buf.add(b"later\n")  # the next line starts a new wait
    gevent.sleep(buf.FLUSH_S * 4)
    assert sink.writes == 2 and sink.getvalue().endswith(b"later\n")


def test_a_full_buffer_is_written_at_once_and_flush_empties_it():
    sink = Sink()
    buf = LineBuffer(lambda: sink)
    line = b"x" * 1023 + b"\n"
    for _ in range(buf.MAX_BYTES // len(line)):
        buf.add(line)
    assert sink.writes == 1 and len(sink.getvalue()) == buf.MAX_BYTES  # no wait past the bound
    buf.add(b"tail\n")
    buf.flush()  # as at exit
    assert sink.writes == 2 and sink.getvalue().endswith(b"tail\n")
    buf.flush()
    assert sink.writes == 2  # nothing waits: no empty write


def test_a_closed_output_drops_the_lines_without_raising():
    sink = Sink()
    sink.close()
    buf = LineBuffer(lambda: sink)
    buf.add(b"lost\n")
    buf.flush()
    buf.add(b"again\n")
    gevent.sleep(buf.FLUSH_S * 4)  # the timer's flush must not raise in the event loop either


def test_the_time_is_iso_8601_utc_with_milliseconds():
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    text = utc_now_ms()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", text)
    parsed = dt.datetime.fromisoformat(text)
    assert before <= parsed <= dt.datetime.now(dt.UTC)


def test_a_per_second_value_is_computed_once_a_second():
    from common.clock import PerSecond

    calls: list[int] = []
    clock = PerSecond(lambda whole: calls.append(whole) or f"s{whole}")
    assert [clock(t) for t in (100.0, 100.2, 100.999, 101.0, 101.5, 99.9)] == [
        "s100",
        "s100",
        "s100",
        "s101",
        "s101",
        "s99",
    ]
    assert calls == [100, 101, 99]
