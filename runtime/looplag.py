"""How long the event loop was held: one process, one greenlet per connection, so anything
that runs without yielding (a slow match, a large encode) delays every connection at once.

A ticker greenlet asks to wake every `interval_s`; how late it wakes is the loop's lag. The
gauge `sluice_event_loop_lag_seconds` shows the worst lag of the last `window_s` (so a scrape
every 15 s still sees a short block). A watcher on a native thread notices when the ticker has
not run for `report_s` and takes the stack the main thread is running at that moment: the
greenlet holding the loop. It only records it (a thread must not take gevent's locks) and the
ticker logs it once the loop is free, with the block's measured length.

gevent's own monitor thread was tried first: its report walks every object on the heap while
holding the GIL, which under load made each block longer and set off the next one.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections import deque
from typing import Any

import gevent
from gevent import monkey

log = logging.getLogger("sluice.loop")


class LoopLag:
    """The event loop's lag, measured continuously; blocks past `report_s` are logged."""

    def __init__(
        self, gauge: Any = None, *, interval_s: float = 0.05, window_s: float = 10.0, report_s: float = 0.1
    ) -> None:
        self.gauge = gauge
        self.interval_s = interval_s
        self.window_s = window_s
        self.report_s = report_s
        self.last = 0.0
        self.worst_ever = 0.0
        self._recent: deque[tuple[float, float]] = deque()  # (when, lag), worst kept per tick
        self._blocked: deque[list[str]] = deque(maxlen=32)  # stacks the watcher took
        self._beat = 0  # ticks so far: the watcher sees the loop move by this
        self._running = False
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> LoopLag:
        self._running = True
        self._greenlet = gevent.spawn(self._tick_forever)
        get_ident = monkey.get_original("_thread", "get_ident")
        start_thread = monkey.get_original("_thread", "start_new_thread")
        start_thread(self._watch, (get_ident(),))
        return self

    def stop(self) -> None:
        self._running = False
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def worst(self) -> float:
        """The worst lag seen in the last `window_s`."""
        return max((lag for _, lag in self._recent), default=0.0)

    # -- the ticker ---------------------------------------------------------------------------
    def _tick_forever(self) -> None:
        while True:
            began = time.perf_counter()
            gevent.sleep(self.interval_s)
            self._beat += 1
            self.record(max(0.0, time.perf_counter() - began - self.interval_s))

    def record(self, lag: float) -> None:
        now = time.monotonic()
        self.last = lag
        self.worst_ever = max(self.worst_ever, lag)
        while self._recent and (self._recent[-1][1] <= lag or self._recent[0][0] < now - self.window_s):
            if self._recent[-1][1] <= lag:
                self._recent.pop()  # a smaller lag before a larger one never is the worst
            else:
                self._recent.popleft()  # out of the window
        self._recent.append((now, lag))
        if self.gauge is not None:
            self.gauge.set(self.worst())
        while self._blocked:
            stack = self._blocked.popleft()
            log.warning(
                "the event loop was held %.0f ms (past %.0f ms) by the greenlet running:%s",
                lag * 1000,
                self.report_s * 1000,
                "".join("\n  " + line.rstrip().replace("\n", "\n  ") for line in stack),
            )

    # -- the watcher (a native thread) ----------------------------------------------------------
    def _watch(self, main_thread: int) -> None:
        """Every `report_s / 2`: if the ticker has not moved for `report_s`, take the main
        thread's current stack once per block (cheap: one frame chain, no heap walk)."""
        sleep = monkey.get_original("time", "sleep")
        seen, since, reported = self._beat, time.monotonic(), False
        while self._running:
            sleep(self.report_s / 2)
            beat, now = self._beat, time.monotonic()
            if beat != seen:
                seen, since, reported = beat, now, False
                continue
            if reported or now - since < self.report_s + self.interval_s:
                continue
            frame = sys._current_frames().get(main_thread)
            if frame is not None:
                self._blocked.append(traceback.format_stack(frame)[-12:])
                reported = True
