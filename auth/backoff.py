"""Reconnect backoff: the `retry:` each SSE connection is told, paced per connection id (`sid`).

Each connect increments a counter for its sid that lives in Redis for a sliding window (every
connect pushes the window out), so all processes see the same count. The n-th connect within
the window gets a retry drawn uniformly from [base, min(cap, base * 2**(n-1))] — exponential
growth with full jitter above the base. A connection that stays away longer than the window
starts again from the base, and so does one whose connection stayed up for a while (`healthy`).
Without Redis the counters live in the process.

Long-poll clients are paced with the same counters in fixed windows: a client (its `sid`, else
its token subject and address) that polls more than `max_rate` times a second over a window is
told to wait with `Retry-After` for as long as its excess takes to drain, and refused with 429
past four times its budget.
"""

from __future__ import annotations

import random
import time
from typing import Any

KEY = "sluice:backoff:{}"
POLL_KEY = "sluice:poll:{}"
LOCAL_POLL_KEY = "poll:{}"  # this process's own count (never sent to Redis)
POLL_WINDOW_S = 10


class Backoff:
    """Counts connects per sid and turns the count into a `retry:` value in milliseconds."""

    def __init__(
        self,
        redis: Any,
        *,
        base_ms: int = 1000,
        max_ms: int = 60000,
        window_s: int = 60,
        rng: random.Random | None = None,
    ) -> None:
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

    def healthy(self, sid: str) -> None:
        """The sid's connection stayed up: forget its reconnects (the next retry is short)."""
        key = KEY.format(sid)
        try:
            self.redis.delete(key)
        except Exception:  # noqa: BLE001 - Redis down: the process counter
            pass
        self._local.pop(key, None)

    def jittered_ms(self, count: int) -> int:
        """A retry for the count drawn with full jitter, for clients without a sid."""
        return int(self.base_ms + self.rng.random() * (self.retry_ms(count) - self.base_ms))

    def poll(self, key: str, max_rate: float) -> tuple[int, bool]:
        """Count one long-poll of `key`; return the Retry-After in seconds (0 within its
        budget) and whether the poll is refused outright (past four times the budget)."""
        budget = max(1, int(max_rate * POLL_WINDOW_S))
        # Counted in this process first: while it has seen at most half the budget, no Redis
        # round trip (a poll answer is cheap, and one per answer was a third of its cost). Past
        # half, the fleet's count decides, seeded with what this process counted.
        local = self._count_locally(LOCAL_POLL_KEY.format(key), POLL_WINDOW_S, sliding=False)
        half = budget // 2
        if local <= half:
            return 0, False
        fleet = self._count(
            POLL_KEY.format(key), POLL_WINDOW_S, sliding=False, amount=local if local == half + 1 else 1
        )
        count = max(fleet, local)
        if count <= budget:
            return 0, False
        wait = min(max(1, self.max_ms // 1000), -(-(count - budget) // max(1, int(max_rate))))
        return wait, count > 4 * budget

    def retry_ms(self, count: int) -> int:
        """The largest retry for a count, for hints without recording a connect."""
        return min(self.max_ms, self.base_ms * 2 ** min(max(count, 1) - 1, 30))

    def _count(self, key: str, window_s: int | None = None, sliding: bool = True, amount: int = 1) -> int:
        """INCR a counter (by `amount`); a sliding window is pushed out by every count, a fixed
        one is not."""
        window_s = window_s or self.window_s
        if sliding:
            key = KEY.format(key)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                if not sliding:
                    pipe.set(key, 0, ex=window_s, nx=True)
                pipe.incrby(key, amount)
                if sliding:
                    pipe.expire(key, window_s)
                results = pipe.execute()
            return int(results[0] if sliding else results[1])
        except Exception:  # noqa: BLE001 - Redis down: count in this process instead
            return self._count_locally(key, window_s, sliding)

    def _count_locally(self, key: str, window_s: int, sliding: bool) -> int:
        now = time.monotonic()
        if len(self._local) > 100_000:  # bounded: forget entries whose window has passed
            self._local = {k: v for k, v in self._local.items() if now - v[1] < 3600}
            if len(self._local) > 100_000:
                self._local.clear()
        count, since = self._local.get(key, (0, now))
        if now - since < window_s:
            count += 1
        else:
            count, since = 1, now
        self._local[key] = (count, now if sliding else since)
        return count
