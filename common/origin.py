"""The one HTTP client Sluice calls its origin with (origin authorization, webhooks): a POST
to a fixed URL with a hard deadline, the answer read up to a size limit."""

from __future__ import annotations

import http.client
import urllib.parse
from dataclasses import dataclass

import gevent


class OriginError(Exception):
    """The origin could not be reached, or did not answer within the deadline."""


@dataclass(frozen=True, slots=True)
class OriginAnswer:
    status: int
    content_type: str
    body: bytes


class OriginClient:
    """POSTs to one URL (http or https); each call opens its own connection."""

    def __init__(self, url: str, *, timeout_s: float, user_agent: str, max_answer_bytes: int = 65536) -> None:
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self.max_answer_bytes = max_answer_bytes

    def post(self, body: bytes, headers: dict[str, str]) -> OriginAnswer:
        """The origin's answer (any status); OriginError when there is none in time. The body
        is read up to `max_answer_bytes` + 1, so a caller can tell an oversized answer."""
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        try:
            with gevent.Timeout(self.timeout_s):
                conn = cls(self.host, self.port, timeout=self.timeout_s)
                try:
                    conn.request(
                        "POST", self.path, body=body, headers={"User-Agent": self.user_agent, **headers}
                    )
                    response = conn.getresponse()
                    answer = response.read(self.max_answer_bytes + 1)
                    return OriginAnswer(response.status, response.getheader("Content-Type") or "", answer)
                finally:
                    conn.close()
        except (gevent.Timeout, OSError, http.client.HTTPException) as exc:
            raise OriginError(str(exc) or "timeout") from None
