"""History reads that also show events accepted but not yet committed, never twice.

The batcher's pending requests are snapshotted *before* the committed rows are queried. A pending
event that commits in between is then either in the rows (skipped from the pending part) or
committed after the query (still shown as pending: its id is not known to this page, and `next`
stays the last committed id, so the next page shows it as committed, once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions

from auth.grants import Grants
from common.problems import Problem
from ingest.batcher import Batcher, pending_events
from ingest.events import StoredEvent
from ingest.ids import format_position
from ingest.pending import PendingMirror, RemotePending
from ingest.pool import Pool
from ingest.store import EventStore

READ_BY_CLIENT_MAX_STREAMS = 1000  # granted streams a read by client may cover (else 400)

log = logging.getLogger("sluice.reads")


@dataclass
class Page:
    """One page of history: committed events first, then pending ones; `next` resumes after.
    `reset` says that history after the requested point is gone (see `history_gone`)."""

    events: list[StoredEvent]
    next: int
    reset: dict[str, Any] | None = None
    pending_scope: str = "fleet"  # "process": other processes' pending events are not included


def history_gone(
    store: EventStore, conn: psycopg2.extensions.connection, streams: Sequence[str], after: int
) -> dict[str, Any] | None:
    """The `reset` notice for a resume point older than what the streams still hold (events
    after it were pruned, or the stream was deleted and re-created), or None. SSE sends it as
    `event: reset`, long-poll and history reads as a `reset` field."""
    gone = store.history_gone(conn, streams, after)
    if gone is None:
        return None
    names, oldest = gone
    return {
        "reason": "history-gone",
        "streams": names,
        "oldest": None if oldest is None else format_position(oldest),
    }


def read_history(
    store: EventStore,
    pool: Pool,
    batcher: Batcher,
    grants: Grants,
    *,
    client_id: str | None,
    stream: str | None,
    after: int,
    limit: int,
    mirror: PendingMirror | None = None,
) -> Page:
    snapshot = pending_events(batcher, client_id=client_id, stream=stream)
    remote: list[RemotePending] = []
    scope = "process"
    if mirror is not None:
        try:
            remote = mirror.others(client_id, stream)  # before the query, like the local part
            scope = "fleet"
        except Exception as exc:  # noqa: BLE001 - Redis down: this process's pending only
            log.warning("pending events of other processes unavailable: %s", exc)
    with pool.connection() as conn:
        streams = None if stream is None else [stream]
        if streams is None and client_id is not None and not grants.everything:
            # By client, within a grant: the granted streams (a pass over stream names), then
            # an index range per stream, never a walk of the client's whole history.
            streams = [s for s in store.streams_matching(conn, grants.regexes) if grants.allows(s)]
            if len(streams) > READ_BY_CLIENT_MAX_STREAMS:
                raise Problem(
                    400,
                    "grant-too-wide",
                    f"this token's grant covers more than "
                    f"{READ_BY_CLIENT_MAX_STREAMS} streams: read by `stream` instead",
                    field="clientId",
                    limit=READ_BY_CLIENT_MAX_STREAMS,
                )
        rows = (
            []
            if streams == []
            else store.read_events(
                conn,
                after=after,
                limit=limit,
                client_id=client_id,
                streams=streams,
                stream_regexes=grants.sql_filter(),
            )
        )
        # The resume rule, as SSE and long-poll apply it: `after=0` on a pruned stream is told
        # its history is gone too.
        reset = history_gone(store, conn, [stream], after) if stream is not None else None
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
            # A batch being written names its events by place (negative) until it commits: not
            # an id yet, so still pending. A real id is committed: in the rows, or behind
            # `after`, or (committed after the query) still shown as pending here.
            if written is not None and (
                written.duplicate or written.id in committed_ids or 0 < written.id <= after
            ):
                continue
            rows.append(
                StoredEvent(None, ev.stream, ev.type, ev.data, req.client_id, ev.key, None, pending=True)
            )
        if remote:
            # Another process's event that committed between the snapshot and the query is in
            # the rows: the same (client, key) — or, unkeyed, the same content — is skipped.
            seen = {(r.client_id, r.stream, r.type, r.data, r.key) for r in rows if not r.pending}
            keys = {(r.client_id, r.key) for r in rows if r.key is not None and not r.pending}
            for e in remote:
                if len(rows) >= limit:
                    break
                if (
                    not grants.allows(e.stream)
                    or (e.client_id, e.key) in keys
                    or (e.client_id, e.stream, e.type, e.data, e.key) in seen
                ):
                    continue
                rows.append(
                    StoredEvent(None, e.stream, e.type, e.data, e.client_id, e.key, None, pending=True)
                )
    return Page(rows, next_position, reset, scope)
