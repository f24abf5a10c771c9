"""Reconnect backoff: the `retry:` each SSE connection is told, paced per connection id (`sid`).

Each connect increments a counter for its sid that lives in Redis for a sliding window (every
connect pushes the window out), so all processes see the same count. The n-th connect within
the window gets a retry drawn uniformly from [base, min(cap, base * 2**(n-1))] — exponential
growth with full jitter above the base. A connection that stays away longer than the window
starts again from the base. Without Redis the counters live in the process.
"""
from __future__ import annotations

import random
import time
from typing import Any

KEY = "sluice:backoff:{}"


class Backoff:
    """Counts connects per sid and turns the count into a `retry:` value in milliseconds."""

    def __init__(self, redis: Any, *, base_ms: int = 1000, max_ms: int = 60000,
                 window_s: int = 60, rng: random.Random | None = None) -> None:
        self.redis = redis
        self.base_ms = base_ms
        self.max_ms = max(max_ms, base_ms)
        self.window_s = window_s
        self.rng = rng or random.Random()
        self._local: dict[str, tuple[int, float]] = {}

    def connect(self, sid: str) -> tuple[int, int]:
        """Record a connect; return (connects within the window, retry in ms)."""
        count = self._count(sid)
        ceiling = min(self.max_ms, self.base_ms * 2 ** min(count - 1, 30))
        return count, int(self.base_ms + self.rng.random() * (ceiling - self.base_ms))

    def retry_ms(self, count: int) -> int:
        """The largest retry for a count, for hints without recording a connect."""
        return min(self.max_ms, self.base_ms * 2 ** min(max(count, 1) - 1, 30))

    def _count(self, sid: str) -> int:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(KEY.format(sid))
                pipe.expire(KEY.format(sid), self.window_s)
                count, _ = pipe.execute()
            return int(count)
        except Exception:  # noqa: BLE001 - Redis down: count in this process instead
            return self._count_locally(sid)

    def _count_locally(self, sid: str) -> int:
        now = time.monotonic()
        if len(self._local) > 100_000:  # bounded: forget entries whose window has passed
            self._local = {k: v for k, v in self._local.items() if now - v[1] < self.window_s}
        count, last = self._local.get(sid, (0, now))
        count = count + 1 if now - last < self.window_s else 1
        self._local[sid] = (count, now)
        return count
