"""Which streams are busy: every hub sees every commit of the fleet, so each process can count
events per stream for the whole fleet without asking anyone (the dashboard's streams table).
Bounded: the least recently active streams are forgotten first."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any


class StreamActivity:
    """Per stream: events seen since this process started, the last position and when."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._streams: OrderedDict[str, list[float]] = OrderedDict()  # [count, position, time]

    def record(self, events: Iterable[Sequence[Any]]) -> None:
        """One commit's events (position, stream, type, data), in position order."""
        now = time.time()
        streams = self._streams
        for position, stream, _, _ in events:
            entry = streams.get(stream)
            if entry is None:
                streams[stream] = [1, position, now]
            else:
                entry[0] += 1
                entry[1] = position
                entry[2] = now
                streams.move_to_end(stream)
        while len(streams) > self.size:
            streams.popitem(last=False)

    def recent(self, n: int) -> list[tuple[str, int, int, float]]:
        """The `n` most recently active streams, newest first: (name, events, position, time)."""
        out = []
        for name in reversed(self._streams):
            count, position, at = self._streams[name]
            out.append((name, int(count), int(position), at))
            if len(out) == n:
                break
        return out

    def get(self, stream: str) -> tuple[int, int, float] | None:
        entry = self._streams.get(stream)
        return None if entry is None else (int(entry[0]), int(entry[1]), entry[2])
