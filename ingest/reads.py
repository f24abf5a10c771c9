"""History reads that also show events accepted but not yet committed, never twice.

The batcher's pending requests are snapshotted *before* the committed rows are queried. A pending
event that commits in between is then either in the rows (skipped from the pending part) or
committed after the query (still shown as pending: its id is not known to this page, and `next`
stays the last committed id, so the next page shows it as committed, once).
"""
from __future__ import annotations

from dataclasses import dataclass

from auth.grants import Grants
from ingest.batcher import Batcher, pending_events
from ingest.events import StoredEvent
from ingest.pool import Pool
from ingest.store import EventStore


@dataclass
class Page:
    """One page of history: committed events first, then pending ones; `next` resumes after."""

    events: list[StoredEvent]
    next: int


def read_history(store: EventStore, pool: Pool, batcher: Batcher, grants: Grants, *,
                 client_id: str | None, stream: str | None, after: int, limit: int) -> Page:
    snapshot = pending_events(batcher, client_id=client_id, stream=stream)
    with pool.connection() as conn:
        rows = store.read_events(conn, after=after, limit=limit, client_id=client_id,
                                 streams=None if stream is None else [stream],
                                 stream_regexes=grants.sql_filter())
    next_position = rows[-1].position if rows else after
    if len(rows) < limit:
        committed_ids = {row.id for row in rows}
        for req, i in snapshot:
            if len(rows) >= limit:
                break
            if req.cancelled:
                continue
            ev = req.events[i]
            if not grants.allows(ev.stream):
                continue
            written = req.results[i] if req.results is not None else None
            if written is not None and (written.duplicate or written.id in committed_ids
                                        or written.id <= after):
                continue
            rows.append(StoredEvent(None, ev.stream, ev.type, ev.data, req.client_id, ev.key,
                                    None, pending=True))
    return Page(rows, next_position)
