"""Subscription notices for the origin (`SLUICE_WEBHOOK_URL`): signed, batched, retried.

Each notice is `{"event": "subscribe" | "unsubscribe", "stream", "subject", "sid", "time"}`
(`subject` is the token's `sub`, or the origin grant's). Notices wait in a bounded queue and are
sent in batches — `POST {"notices": [...]}` — by one greenlet, so a slow or dead origin never
slows streaming. A batch that fails (no answer within the timeout, or a non-2xx) is sent again
after a growing pause (0.5 s doubling to 30 s), in order; if the queue fills meanwhile, the
oldest notices are dropped and counted (`sluice_webhook_notices_total{outcome="dropped"}`).

Every request carries `Sluice-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>">` with the webhook secret, so the origin can check it came from Sluice and is
fresh. `verify_signature` below is how to check one (the tests use it too).
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import hmac
import time
from typing import Any

import gevent
import orjson
from gevent.event import Event

from common.origin import OriginClient, OriginError

BATCH_MAX = 100
QUEUE_MAX = 10000
BATCH_WAIT_S = 0.25
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


def sign(secret: str, body: bytes, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def verify_signature(secret: str, body: bytes, header: str, tolerance_s: float = 300) -> bool:
    """True if `header` is a valid Sluice-Signature for `body`, made within `tolerance_s`."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        at = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - at) > tolerance_s:
        return False
    expected = sign(secret, body, at).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class WebhookNotifier:
    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout_s: float = 5.0,
        metrics: Any = None,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        self.origin = OriginClient(url, timeout_s=timeout_s, user_agent="sluice-webhook")
        self.secret = secret
        self.timeout_s = timeout_s
        self.metrics = metrics  # labelled Counter (outcome), or None
        self.queue: collections.deque = collections.deque()
        self.queue_max = queue_max
        self._wake = Event()
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> WebhookNotifier:
        self._greenlet = gevent.spawn(self._send_forever)
        return self

    def stop(self, flush_s: float = 2.0) -> None:
        """Give queued notices a moment to go out, then stop."""
        deadline = time.monotonic() + flush_s
        while self.queue and time.monotonic() < deadline:
            gevent.sleep(0.05)
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def notify(self, event: str, stream: str, subject: str, sid: str) -> None:
        """Queue a notice; never waits."""
        if len(self.queue) >= self.queue_max:
            self.queue.popleft()
            self._count("dropped")
        self.queue.append(
            {
                "event": event,
                "stream": stream,
                "subject": subject,
                "sid": sid,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            }
        )
        self._wake.set()

    def _send_forever(self) -> None:
        pause = RETRY_FIRST_S
        while True:
            self._wake.wait()
            self._wake.clear()
            gevent.sleep(BATCH_WAIT_S)  # let a burst of connects share one request
            while self.queue:
                batch = [self.queue.popleft() for _ in range(min(BATCH_MAX, len(self.queue)))]
                body = orjson.dumps({"notices": batch})
                while not self._post(body):  # the same batch again, in order, until it lands
                    gevent.sleep(pause)
                    pause = min(RETRY_MAX_S, pause * 2)
                self._count("sent", len(batch))
                pause = RETRY_FIRST_S

    def _post(self, body: bytes) -> bool:
        try:
            reply = self.origin.post(
                body, {"Content-Type": "application/json", "Sluice-Signature": sign(self.secret, body)}
            )
        except OriginError:
            return False
        return 200 <= reply.status < 300

    def _count(self, outcome: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.labels(outcome).inc(n)
