"""Per-credential and per-address connection limits for subscribers (SSE and long-poll).

Counted in the process: a connection is held by exactly one process, and counting there costs
nothing per event. With several worker processes a client can hold up to the limit in each, so
these limits bound abuse of one process's memory and sockets rather than give an exact total.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from common.problems import Problem


def token_key(token: str) -> str:
    """What MAX_CONNECTIONS_PER_TOKEN counts by: a digest, never the token itself."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]


class ConnectionLimits:
    """Counts held connections by credential key and by client address."""

    def __init__(self, per_token: int, per_ip: int, refused: Any = None) -> None:
        self.per_token = per_token
        self.per_ip = per_ip
        self.refused = refused  # a labelled Prometheus counter, or None
        self.by_token: dict[str, int] = {}
        self.by_ip: dict[str, int] = {}
        self.held: dict[str, int] = {"sse": 0, "poll": 0}  # by transport, for the metrics

    def acquire(self, token_key: str, address: str | None,
                transport: str = "sse") -> Callable[[], None]:
        """Count one connection, or raise 429 if it would pass a limit. Returns the release
        function (safe to call more than once)."""
        address = address or "-"
        if self.per_token and self.by_token.get(token_key, 0) >= self.per_token:
            self._refuse("token", f"this token already holds {self.per_token} connections",
                         self.per_token)
        if self.per_ip and self.by_ip.get(address, 0) >= self.per_ip:
            self._refuse("ip", f"this address already holds {self.per_ip} connections",
                         self.per_ip)
        if self.per_token:
            self.by_token[token_key] = self.by_token.get(token_key, 0) + 1
        if self.per_ip:
            self.by_ip[address] = self.by_ip.get(address, 0) + 1
        self.held[transport] = self.held.get(transport, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.held[transport] -= 1
            if self.per_token:
                _decrement(self.by_token, token_key)
            if self.per_ip:
                _decrement(self.by_ip, address)

        return release

    def _refuse(self, which: str, detail: str, limit: int) -> None:
        if self.refused is not None:
            self.refused.labels(which).inc()
        raise Problem(429, "too-many-connections", detail + "; close one first",
                      headers={"Retry-After": "10"}, limit=limit)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
