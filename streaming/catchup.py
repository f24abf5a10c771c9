"""Catch-up: the committed history a subscriber missed, read in pages in its own greenlet."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import gevent

from auth.grants import pattern_to_regex
from ingest.events import StoredEvent
from ingest.pool import Pool
from ingest.store import EventStore


def streams_for(
    pool: Pool,
    store: EventStore,
    streams: Sequence[str],
    patterns: Sequence[str],
    admits: Callable[[str], bool] | None = None,
) -> list[str]:
    """The exact streams of a subscription, and those its patterns match now that `admits`
    lets it see (streams created later reach it live, through the hub)."""
    if not patterns:
        return list(streams)
    with pool.connection() as conn:
        matched = store.streams_matching(conn, [pattern_to_regex(p) for p in patterns])
    if admits is not None:
        matched = [stream for stream in matched if admits(stream)]
    return list(dict.fromkeys([*streams, *matched]))


def catch_up(
    pool: Pool, store: EventStore, streams: Sequence[str], after: int, upto: int, page: int
) -> Iterator[list[StoredEvent]]:
    """Pages of committed events of `streams` in (after, upto], each read through the pool."""
    while after < upto:
        with pool.connection() as conn:
            rows = store.read_events(conn, after=after, upto=upto, limit=page, streams=list(streams))
        if not rows:
            return
        yield rows
        after = rows[-1].position
        if len(rows) < page:
            return
        gevent.sleep(0)  # let live delivery to other clients run between pages
