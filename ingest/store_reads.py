"""Reading history: index ranges by stream, by client, by position, and by Mercure topic.

One part of EventStore (ingest/store.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from ingest.events import StoredEvent
from ingest.store_base import (
    _EVENT_COLUMNS,
    SQL_STREAM_PAGE,
    SQL_STREAMS_CLIENT_PAGE,
    SQL_STREAMS_PAGE,
    SQL_TOPICS_PLAN,
    UPTO_MAX,
    _transaction,
)


class Reads:
    """Reading history: index ranges by stream, by client, by position, and by Mercure topic."""

    slice_width: int

    # -- reads --------------------------------------------------------------------------------
    def read_events(
        self,
        conn: psycopg2.extensions.connection,
        *,
        after: int,
        limit: int,
        client_id: str | None = None,
        streams: Iterable[str] | None = None,
        stream_regexes: Sequence[str] | None = None,
        upto: int | None = None,
    ) -> list[StoredEvent]:
        """Committed events with after < id (<= upto), oldest first, by client and/or streams.

        Every shape is an index range scan that stops after `limit` rows: by stream on
        (stream, id), several streams as one such range each merged by position, by client on
        (client_id, id), neither on (id). `stream_regexes` (POSIX regexes, any of which may
        match) restricts a read by client to the streams the caller is granted; None means no
        restriction (a read by stream was checked against the grants already).
        """
        if stream_regexes is not None and not stream_regexes and streams is None:
            return []
        sql, params = self.read_query(
            after=after,
            limit=limit,
            client_id=client_id,
            streams=streams,
            stream_regexes=stream_regexes,
            upto=upto,
        )
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return [StoredEvent(*row) for row in cur.fetchall()]

    def read_with_topics(
        self,
        conn: psycopg2.extensions.connection,
        stream: str,
        topics: Sequence[str],
        *,
        after: int,
        upto: int,
        limit: int,
    ) -> list[StoredEvent]:
        """Events of `stream` in (after, upto] whose data holds a `topics` array naming one of
        `topics`, oldest first: for the Mercure stream, through its topic index (migration
        0005), so the cost follows the updates that match, not every update kept."""
        with _transaction(conn) as cur:
            cur.execute(SQL_TOPICS_PLAN)
            cur.execute(self.topics_query(stream), (stream, list(topics), after, upto, limit))
            return [StoredEvent(*row) for row in cur.fetchall()]

    @staticmethod
    def topics_query(stream: str) -> str:
        """`read_with_topics`'s statement (tests EXPLAIN it)."""
        return (
            "SELECT " + _EVENT_COLUMNS + " FROM events WHERE stream = %s "
            "AND ((data::jsonb) -> 'topics') ?| %s::text[] AND id > %s AND id <= %s "
            "ORDER BY id LIMIT %s"
        )

    def read_query(
        self,
        *,
        after: int,
        limit: int,
        client_id: str | None = None,
        streams: Iterable[str] | None = None,
        stream_regexes: Sequence[str] | None = None,
        upto: int | None = None,
    ) -> tuple[str, list[Any]]:
        """The statement `read_events` runs, and its parameters (tests EXPLAIN it)."""
        high = UPTO_MAX if upto is None else upto
        if streams is not None:
            names = list(dict.fromkeys(streams))
            if client_id is not None:
                sql = SQL_STREAMS_CLIENT_PAGE
                params: list[Any] = [names, client_id, after, high, limit, limit]
                if len(names) == 1:
                    sql = SQL_STREAM_PAGE.replace("stream = %s", "stream = %s AND client_id = %s")
                    params = [names[0], client_id, after, high, limit]
            elif len(names) == 1:
                sql, params = SQL_STREAM_PAGE, [names[0], after, high, limit]
            else:
                sql, params = SQL_STREAMS_PAGE, [names, after, high, limit, limit]
        else:
            where = ["id > %s", "id <= %s"]
            params = [after, high]
            if client_id is not None:
                where.append("client_id = %s")
                params.append(client_id)
            if stream_regexes is not None:
                where.append("stream ~ ANY(%s)")
                params.append(list(stream_regexes))
            params.append(limit)
            sql = "SELECT {cols} FROM events WHERE " + " AND ".join(where) + " ORDER BY id LIMIT %s"
        return sql.format(cols=_EVENT_COLUMNS), params

    def history_gone(
        self, conn: psycopg2.extensions.connection, names: Sequence[str], after: int
    ) -> tuple[list[str], int | None] | None:
        """If some of `names` lost history after position `after` (pruned, or deleted and
        re-created), those streams and the oldest position they still hold; else None."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT s.name, (SELECT id FROM events e WHERE e.stream = s.name ORDER BY e.id"
                " LIMIT 1) FROM streams s WHERE s.name = ANY(%s) AND s.pruned_upto > %s",
                (list(names), after),
            )
            rows = cur.fetchall()
        if not rows:
            return None
        held = [r[1] for r in rows if r[1] is not None]
        return sorted(r[0] for r in rows), (min(held) if held else None)
