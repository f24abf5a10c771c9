"""One Mercure subscriber's event stream: a `retry:` preamble, the updates it missed (read from
durable history, so any process can resume any id, also after a restart), then live updates.

It shares the native stream's writer (`streaming.connection.StreamWriter`): the queue bound,
heartbeats from the hub's ticker, parking and the hub's direct writes while idle, stuck-write and
disconnect handling. Only the bytes differ: each update is written as built once for all subscribers, its
`id:` the update's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import gevent

from ingest.events import StoredEvent
from ingest.pool import DatabaseUnavailable
from mercure.fanout import MercureFanout, MercureSubscription
from mercure.selectors import exact_topic
from mercure.updates import MERCURE_STREAM, Update
from streaming.catchup import catch_up
from streaming.connection import StreamWriter, framing
from streaming.deps import StreamingServices
from streaming.subscription import LiveEvent


class MercureConnection(StreamWriter):
    """A Mercure subscription admitted by the door's checks, and everything it writes."""

    sub: MercureSubscription

    def __init__(
        self,
        svc: StreamingServices,
        fanout: MercureFanout,
        sub: MercureSubscription,
        start: int | None,
        retry_ms: int,
        pace_key: str,
        environ: dict[str, Any],
        release: Callable[[], None],
    ) -> None:
        self.svc = svc
        self.fanout = fanout
        self.sub = sub
        self.environ = environ
        self.release = release
        self.retry_ms = retry_ms
        self.pace_key = pace_key
        self.opened_at = time.monotonic()
        self.resume = start
        self.seam = fanout.add(sub)
        self.start = self.seam if start is None else start
        self._watch()

    def _leave(self) -> None:
        self.fanout.remove(self.sub)  # and the hub

    def stream(self) -> Iterator[bytes]:
        sub = self.sub
        if self.resume is None:
            self._from_now()
        sub.last = self.start
        try:
            yield from self._write(framing.retry_only(self.retry_ms))
            try:
                if (yield from self._catch_up()):
                    return
            except DatabaseUnavailable:
                yield framing.retry_only(self.svc.backoff.retry_ms(2))
                return
            sub.last = max(sub.last, self.seam)
            if self._park():
                return  # its own writer goes on; pywsgi lets go of the connection
            yield from self._live()
            yield framing.retry_only(self.retry_ms)
        finally:
            if not self.parked:
                self._finish()

    def _catch_up(self) -> Generator[bytes, None, bool]:
        """The retained updates in (start, seam] this subscriber may see, page by page; True if
        the subscription closed meanwhile. Exact-topic selectors read through the topic index
        (only the updates naming them); templates and `*` read every update, filtered here."""
        sub, matcher = self.sub, self.fanout.matcher
        if self.start >= self.seam:
            return False
        pages = catch_up(
            self.svc.pool,
            self.svc.store,
            [MERCURE_STREAM],
            self.start,
            self.seam,
            self.svc.settings.catchup_page,
        )
        if all(exact_topic(s) for s in sub.selectors):  # by the topic index
            pages = self._by_topics(list(sub.selectors))
        for rows in pages:
            if sub.closed and not sub.overflowed:
                return True
            updates = (Update.from_data(row.data) for row in rows)
            out = b"".join(u.sse() for u in updates if sub.wants(u, matcher))
            if out:
                yield from self._write(out)
            sub.last = rows[-1].position
        return False

    def _by_topics(self, topics: list[str]) -> Iterator[list[StoredEvent]]:
        """Pages of the updates in (start, seam] that name one of `topics`."""
        after, page = self.start, self.svc.settings.catchup_page
        while after < self.seam:
            with self.svc.pool.connection() as conn:
                rows = self.svc.store.read_with_topics(
                    conn, MERCURE_STREAM, topics, after=after, upto=self.seam, limit=page
                )
            if not rows:
                return
            yield rows
            if len(rows) < page:
                return
            after = rows[-1].position
            gevent.sleep(0)  # let live delivery to other clients run between pages

    def _framed(self, event: LiveEvent) -> bytes:
        return event.body  # the update's SSE bytes, its own id included
