"""Catch-up: the committed history a subscriber missed, read in pages in its own greenlet."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import gevent

from ingest.events import StoredEvent
from ingest.pool import Pool
from ingest.store import EventStore


def catch_up(pool: Pool, store: EventStore, streams: Sequence[str], after: int, upto: int,
             page: int) -> Iterator[list[StoredEvent]]:
    """Pages of committed events of `streams` in (after, upto], each read through the pool."""
    while after < upto:
        with pool.connection() as conn:
            rows = store.read_events(conn, after=after, upto=upto, limit=page,
                                     streams=list(streams))
        if not rows:
            return
        yield rows
        after = rows[-1].position
        if len(rows) < page:
            return
        gevent.sleep(0)  # let live delivery to other clients run between pages
