"""The HTTP client: publish with safe retries, read history, subscribe with resume.

Only the standard library speaks HTTP here (`http.client`), so the SDK adds no HTTP stack to an
origin's dependencies.
"""

from __future__ import annotations

import http.client
import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from sluice_client.sse import Event, SSEParser

RETRYABLE = (429, 502, 503, 504)
BATCH_MAX = 1000  # events per publish request (the server's MAX_BATCH_EVENTS default)


class SluiceError(Exception):
    """A request Sluice refused (4xx) or could not serve after the retries (5xx, network)."""

    def __init__(
        self,
        status: int,
        detail: str,
        problem: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail
        self.problem = dict(problem or {})
        self.retry_after = retry_after


@dataclass(frozen=True)
class Published:
    """Where one published event ended up; `duplicate` when its key had been seen before."""

    id: str
    stream: str
    key: str | None
    duplicate: bool = False


@dataclass(frozen=True)
class StoredEvent:
    id: str | None  # None while accepted but not yet committed (`pending`)
    stream: str
    type: str
    data: Any
    client_id: str
    key: str | None
    created_at: str | None
    pending: bool = False


@dataclass(frozen=True)
class HistoryPage:
    events: list[StoredEvent]
    next: str | None  # pass back as `after` for the next page
    reset: Any = None  # set when history after `after` is gone (retention)
    raw: dict[str, Any] = field(default_factory=dict)


def _retry_after(headers: http.client.HTTPMessage) -> float | None:
    raw = headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


class Client:
    """One Sluice server. `token` is a token string or a function returning a fresh one (called
    for every request, so a short-lived token can be renewed)."""

    def __init__(
        self,
        base_url: str,
        token: str | Callable[[], str],
        *,
        timeout_s: float = 10.0,
        retries: int = 5,
        max_wait_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an http(s) URL")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_wait_s = max_wait_s
        self.sleep = sleep

    # -- plumbing ---------------------------------------------------------------------------
    def token(self) -> str:
        return self._token() if callable(self._token) else self._token

    def connection(self, timeout_s: float | None = None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout_s or self.timeout_s)

    def url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None}, doseq=True)
        return self.prefix + path + ("?" + query if query else "")

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        backoff = min(self.max_wait_s, 0.25 * 2**attempt) * (0.5 + random.random() / 2)
        self.sleep(min(self.max_wait_s, retry_after if retry_after is not None else backoff))

    def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None
    ) -> tuple[int, Any]:
        """Send, retrying network errors and 429/5xx answers (after their Retry-After) up to
        `retries` times; returns (status, parsed JSON body) or raises SluiceError. Only
        requests that are safe to repeat use this (publishing carries idempotency keys)."""
        payload = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            headers = {"Authorization": f"Bearer {self.token()}", "Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn = self.connection()
            try:
                conn.request(method, self.url(path, params), body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                if attempt == self.retries:
                    raise SluiceError(0, f"cannot reach Sluice: {exc}") from exc
                self._wait(attempt, None)
                continue
            finally:
                conn.close()
            answer = json.loads(raw) if raw else None
            if resp.status < 400:
                return resp.status, answer
            retry_after = _retry_after(resp.headers)
            if resp.status in RETRYABLE and attempt < self.retries:
                self._wait(attempt, retry_after)
                continue
            detail = answer.get("detail", resp.reason) if isinstance(answer, dict) else resp.reason
            raise SluiceError(
                resp.status, str(detail), answer if isinstance(answer, dict) else None, retry_after
            )
        raise AssertionError("unreachable")

    # -- publishing -------------------------------------------------------------------------
    def publish(self, stream: str, data: Any, *, type: str = "message", key: str | None = None) -> Published:
        """Publish one event; a key is generated when none is given, so the retries this makes
        (or yours, with the same key) never store it twice."""
        return self.publish_many([{"stream": stream, "type": type, "data": data, "key": key}])[0]

    def publish_many(self, events: Iterable[Mapping[str, Any]]) -> list[Published]:
        """Publish events (`{"stream", "data", "type"?, "key"?}`), in requests of at most 1,000
        committed all or nothing each; every event without a key gets a fresh one."""
        prepared = [
            {
                "stream": e["stream"],
                "type": e.get("type") or "message",
                "data": e.get("data"),
                "key": e.get("key") or uuid.uuid4().hex,
            }
            for e in events
        ]
        results: list[Published] = []
        for start in range(0, len(prepared), BATCH_MAX):
            _, answer = self.request("POST", "/api/v1/events", body=prepared[start : start + BATCH_MAX])
            results.extend(
                Published(w["id"], w["stream"], w.get("key"), bool(w.get("duplicate")))
                for w in answer["events"]
            )
        return results

    # -- history ----------------------------------------------------------------------------
    def history(
        self,
        *,
        stream: str | None = None,
        client_id: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> HistoryPage:
        """One page of history, oldest first (pending events included, as the API gives them)."""
        _, answer = self.request(
            "GET",
            "/api/v1/events",
            params={"stream": stream, "clientId": client_id, "after": after, "limit": limit},
        )
        events = [
            StoredEvent(
                e["id"],
                e["stream"],
                e["type"],
                e["data"],
                e["clientId"],
                e.get("key"),
                e.get("createdAt"),
                bool(e.get("pending")),
            )
            for e in answer["events"]
        ]
        return HistoryPage(events, answer.get("next"), answer.get("reset"), answer)

    def iter_history(
        self,
        *,
        stream: str | None = None,
        client_id: str | None = None,
        after: str | None = None,
        limit: int = 500,
    ) -> Iterator[StoredEvent]:
        """Every committed event after `after`, page by page, until the end of history."""
        while True:
            page = self.history(stream=stream, client_id=client_id, after=after, limit=limit)
            committed = [e for e in page.events if not e.pending]
            yield from committed
            if not committed or page.next is None or page.next == after:
                return
            after = page.next

    # -- subscribing ------------------------------------------------------------------------
    def subscribe(
        self,
        streams: str | Sequence[str],
        *,
        last_event_id: str | None = None,
        reconnect: bool = True,
        read_timeout_s: float = 60.0,
        max_retry_s: float = 60.0,
    ) -> Subscription:
        """An iterator of live events (after `last_event_id`, if given), resuming from the
        last id received after every drop. See `Subscription`."""
        names = [streams] if isinstance(streams, str) else list(streams)
        return Subscription(
            self,
            names,
            last_event_id,
            reconnect=reconnect,
            read_timeout_s=read_timeout_s,
            max_retry_s=max_retry_s,
        )


class Subscription:
    """Iterate to receive `Event`s. A dropped connection (network error, server restart, a
    `retry:`-only answer) is reopened after the server's `retry:` delay with `Last-Event-ID`, so
    nothing is missed and nothing repeats. A refusal (4xx: bad token, unknown stream, not
    granted) raises SluiceError; a deleted stream (`event: end`) ends the iteration. `reset`
    events (history gone) are yielded like any other. Call `close()` from another thread, or
    stop iterating and close, to end it."""

    def __init__(
        self,
        client: Client,
        streams: list[str],
        last_event_id: str | None,
        *,
        reconnect: bool,
        read_timeout_s: float,
        max_retry_s: float,
    ) -> None:
        self.client = client
        self.streams = streams
        self.last_event_id = last_event_id
        self.reconnect = reconnect
        self.read_timeout_s = read_timeout_s
        self.max_retry_s = max_retry_s
        self.retry_ms = 1000
        self.reconnects = 0
        self.closed = False
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._parser = SSEParser()
        self._ready: list[Event] = []
        self._reading = False

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Event:
        while not self._ready:
            if self.closed:
                raise StopIteration
            if self._resp is None:
                self._open()
                continue
            self._reading = True
            try:
                chunk = self._resp.read1(65536)
            except (OSError, http.client.HTTPException, ValueError):
                chunk = b""
            finally:
                self._reading = False
            if not chunk:
                self._dropped()
                continue
            self._take(self._parser.feed(chunk))
        return self._ready.pop(0)

    def _take(self, events: list[Event]) -> None:
        if self._parser.last_event_id:
            self.last_event_id = self._parser.last_event_id
        if self._parser.retry_ms is not None:
            self.retry_ms = self._parser.retry_ms
        for event in events:
            if event.type == "end":  # the stream was deleted: nothing more will come
                self.closed = True
                break
            self._ready.append(event)

    def _open(self) -> None:
        headers = {"Authorization": f"Bearer {self.client.token()}", "Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        conn = self.client.connection(self.read_timeout_s)
        try:
            conn.request("GET", self.client.url("/api/v1/sse", {"stream": self.streams}), headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._dropped()
            return
        if resp.status >= 400:
            raw = resp.read()
            conn.close()
            try:
                problem = json.loads(raw)
            except ValueError:
                problem = {}
            if resp.status in RETRYABLE and self.reconnect:
                self._pause(_retry_after(resp.headers))
                return
            self.closed = True
            raise SluiceError(
                resp.status, str(problem.get("detail", resp.reason)), problem, _retry_after(resp.headers)
            )
        self._conn, self._resp = conn, resp
        self._parser = SSEParser()
        self._parser.last_event_id = self.last_event_id or ""

    def _dropped(self) -> None:
        self._close_connection()
        if not self.reconnect or self.closed:
            self.closed = True
            return
        self._pause(None)

    def _pause(self, seconds: float | None) -> None:
        self.reconnects += 1
        wait = self.retry_ms / 1000 if seconds is None else seconds
        self.client.sleep(min(self.max_retry_s, wait))

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._resp = None, None

    def close(self) -> None:
        self.closed = True
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(2)  # wakes a read blocked in another thread
            except OSError:
                pass
        if not self._reading:  # else the reader closes it when its read returns
            self._close_connection()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
