"""How long the event loop was held: one process, one greenlet per connection, so anything
that runs without yielding (a slow match, a large encode) delays every connection at once.

A ticker greenlet asks to wake every `interval_s`; how late it wakes is the loop's lag. The
gauge `sluice_event_loop_lag_seconds` shows the worst lag of the last `window_s` (so a scrape
every 15 s still sees a short block). gevent's monitor thread (`max_blocking_time`) notices a
greenlet that holds the loop past `report_s` and names it with its stack; the thread only
records it (a thread must not take gevent's locks) and the ticker logs it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import gevent

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
        self._blocked: deque[tuple[str, float, list[str]]] = deque(maxlen=32)
        self._greenlet: gevent.Greenlet | None = None
        self._subscribed = False

    def start(self) -> LoopLag:
        self._watch_blocks()
        self._greenlet = gevent.spawn(self._tick_forever)
        return self

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        if self._subscribed:
            import gevent.events

            if self._on_event in gevent.events.subscribers:
                gevent.events.subscribers.remove(self._on_event)

    def worst(self) -> float:
        """The worst lag seen in the last `window_s`."""
        return max((lag for _, lag in self._recent), default=0.0)

    # -- the ticker ---------------------------------------------------------------------------
    def _tick_forever(self) -> None:
        while True:
            began = time.perf_counter()
            gevent.sleep(self.interval_s)
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
        reported: set[str] = set()
        while self._blocked:
            name, past, stack = self._blocked.popleft()
            if name in reported:
                continue  # the monitor saw the same block twice
            reported.add(name)
            log.warning(
                "the event loop was held %.0f ms (past %.0f ms) by %s%s",
                lag * 1000,
                past * 1000,
                name,
                "".join("\n  " + line.rstrip() for line in stack[-12:]),
            )

    # -- gevent's monitor thread --------------------------------------------------------------
    def _watch_blocks(self) -> None:
        import gevent.events

        hub = gevent.get_hub()
        try:
            gevent.config.max_blocking_time = self.report_s
            gevent.config.monitor_thread = True
            gevent.config.print_blocking_reports = False  # the ticker logs them, shorter
            if hub.start_periodic_monitoring_thread() is None:
                raise RuntimeError("gevent's monitor thread did not start")
        except Exception as exc:  # noqa: BLE001 - the ticker still measures the lag
            log.info("event-loop block reports are off: %s", exc)
            return
        gevent.events.subscribers.append(self._on_event)
        self._subscribed = True

    def _on_event(self, event: Any) -> None:
        """In the monitor thread: record, never log (no gevent lock may be taken here)."""
        import gevent.events

        if isinstance(event, gevent.events.EventLoopBlocked):
            lines = [str(line) for line in event.info]
            start = next((i + 1 for i, line in enumerate(lines) if line.startswith("Blocked Stack")), 0)
            stop = next((i for i, line in enumerate(lines) if line.startswith("Info:")), len(lines))
            self._blocked.append((repr(event.greenlet), float(event.blocking_time), lines[start:stop]))
