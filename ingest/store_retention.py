"""Retention and the storage slices: creating, dropping and compacting slices, trimming streams.

One part of EventStore (ingest/store.py)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from ingest.store_base import (
    SLICE_LOCK,
    SQL_DROP_BATCH_KEYS,
    Slice,
    _transaction,
)


class Retention:
    """Retention and the storage slices: creating, dropping and compacting slices, trimming streams."""

    slice_width: int

    # -- slices and retention -------------------------------------------------------------------
    def slices(self, conn: psycopg2.extensions.connection) -> list[Slice]:
        """The partitions of `events`, oldest first."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'events'::regclass"
            )
            found = []
            for name, bound in cur.fetchall():
                lo, hi = (int(v) for v in re.findall(r"\('?(-?\d+)'?\)", bound))
                found.append(Slice(name, lo, hi))
        return sorted(found, key=lambda s: s.lo)

    def ensure_slices(
        self, conn: psycopg2.extensions.connection, upto: int, width: int | None = None
    ) -> list[str]:
        """Create slices until positions up to `upto` have one; returns the names created.
        Each is made empty and attached (SHARE UPDATE EXCLUSIVE on `events`: reads and writes
        go on), under an advisory lock so processes do not race."""
        width = width or self.slice_width
        created: list[str] = []
        with _transaction(conn) as cur:
            cur.execute("SET LOCAL lock_timeout = '5s'")
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SLICE_LOCK,))
            existing = self.slices(conn)
            hi = existing[-1].hi if existing else 0
            while hi <= upto:
                name = f"events_s{hi}"
                cur.execute(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS)")
                cur.execute(
                    f"ALTER TABLE {name} ADD CONSTRAINT {name}_range CHECK (id >= {hi} AND id < {hi + width})"
                )
                cur.execute(
                    f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ({hi}) TO ({hi + width})"
                )
                cur.execute(f"ALTER TABLE {name} DROP CONSTRAINT {name}_range")
                created.append(name)
                hi += width
        return created

    def slice_newest(self, conn: psycopg2.extensions.connection, piece: Slice) -> tuple[int, float] | None:
        """The newest event of a slice: (position, age in seconds), or None if it is empty."""
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT id, extract(epoch FROM now() - created_at) FROM {piece.name} "
                "ORDER BY id DESC LIMIT 1"
            )
            row = cur.fetchone()
        return None if row is None else (row[0], float(row[1]))

    def retention_exempt(self, conn: psycopg2.extensions.connection, default_age_s: int) -> list[str]:
        """Streams that keep history longer than the default age (0 means forever)."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT name FROM streams WHERE retention_max_age_s = 0 OR retention_max_age_s > %s",
                (default_age_s,),
            )
            return [row[0] for row in cur.fetchall()]

    def drop_slice(
        self, conn: psycopg2.extensions.connection, piece: Slice, keep: Sequence[str], step: int = 50_000
    ) -> int:
        """Remove a slice whose events have all expired, except those of the `keep` streams
        (longer retention), which stay in a compacted copy of the slice. Records, per stream
        that lost events, that its history up to the slice's end is gone. Returns the number of
        events removed. Costs one pass over the slice, whatever the total history."""
        with conn.cursor() as cur:
            cur.execute(f"SELECT DISTINCT stream FROM {piece.name}")
            streams = [row[0] for row in cur.fetchall() if row[0] not in set(keep)]
            cur.execute(f"SELECT count(*) FROM {piece.name}")
            total = cur.fetchone()[0]
        kept = 0
        while True:  # the slice's keys first, in bounded steps (a key lives as long as its event)
            with conn.cursor() as cur:  # keys that carry their position
                cur.execute(
                    "DELETE FROM event_keys WHERE ctid = ANY(ARRAY(SELECT ctid FROM "
                    "event_keys WHERE id >= %s AND id < %s AND NOT stream = ANY(%s) "
                    "LIMIT %s))",
                    (piece.lo, piece.hi, list(keep), step),
                )
                if cur.rowcount < step:
                    break
        for lo in range(piece.lo, piece.hi, step):  # keys that name a key batch: by the events
            with conn.cursor() as cur:
                cur.execute(
                    SQL_DROP_BATCH_KEYS.format(slice=piece.name), (lo, min(lo + step, piece.hi), list(keep))
                )
        with conn.cursor() as cur:
            if keep:
                cur.execute(f"SELECT count(*) FROM {piece.name} WHERE stream = ANY(%s)", (list(keep),))
                kept = cur.fetchone()[0]
        if kept:
            self._compact_slice(conn, piece, keep)
        else:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '5s'")
                cur.execute(f"ALTER TABLE events DETACH PARTITION {piece.name} CONCURRENTLY")
                cur.execute(f"DROP TABLE {piece.name}")
                cur.execute("RESET lock_timeout")
            self._drop_key_batches(conn)
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE streams SET pruned_upto = GREATEST(pruned_upto, %s) WHERE name = ANY(%s)",
                (piece.hi - 1, streams),
            )
        return total - kept

    def _drop_key_batches(self, conn: psycopg2.extensions.connection) -> None:
        """Forget the key batches whose every position lies below what any slice holds (a
        compacted slice still holds its range: its kept keys still name their batches)."""
        held = self.slices(conn)
        if held:
            with conn.cursor() as cur:
                cur.execute("DELETE FROM key_batches WHERE upto < %s", (held[0].lo,))

    def _compact_slice(self, conn: psycopg2.extensions.connection, piece: Slice, keep: Sequence[str]) -> None:
        """Swap a slice for a copy holding only the `keep` streams' events."""
        copy = f"events_c{piece.lo}_{int(time.time())}"
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {copy} (LIKE events INCLUDING DEFAULTS)")
            cur.execute(
                f"INSERT INTO {copy} SELECT * FROM {piece.name} WHERE stream = ANY(%s)", (list(keep),)
            )
            cur.execute(
                f"ALTER TABLE {copy} ADD CONSTRAINT {copy}_range CHECK (id >= {piece.lo} AND id < {piece.hi})"
            )
        try:
            with _transaction(conn) as cur:
                # The swap needs an exclusive lock on `events` for a moment; waiting for it in
                # the lock queue would hold up ingest behind it: give up fast, retry next round.
                cur.execute("SET LOCAL lock_timeout = '250ms'")
                cur.execute(f"ALTER TABLE events DETACH PARTITION {piece.name}")
                cur.execute(
                    f"ALTER TABLE events ATTACH PARTITION {copy} FOR VALUES FROM ({piece.lo}) TO ({piece.hi})"
                )
                cur.execute(f"ALTER TABLE {copy} DROP CONSTRAINT {copy}_range")
                cur.execute(f"DROP TABLE {piece.name}")
        except psycopg2.Error:
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {copy}")
            raise

    def streams_to_trim(
        self, conn: psycopg2.extensions.connection, default_age_s: int, default_max_events: int
    ) -> list[tuple[str, int, int]]:
        """(stream, max age s or 0, max events or 0) for each stream whose own rules remove
        events row by row: an age of its own (shorter than the default, or longer: its events
        outlive their slices in compacted copies), or a count limit (only streams that
        received events since they were last counted)."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT name, COALESCE(retention_max_age_s, 0), COALESCE(retention_max_events, %s)"
                " FROM streams WHERE (retention_max_age_s > 0 AND (%s = 0 OR retention_max_age_s"
                " <> %s)) OR (COALESCE(retention_max_events, %s) > 0 AND last_id > count_checked_id)",
                (default_max_events, default_age_s, default_age_s, default_max_events),
            )
            return [(r[0], int(r[1]), int(r[2])) for r in cur.fetchall()]

    def trim_stream(
        self,
        conn: psycopg2.extensions.connection,
        stream: str,
        max_age_s: int,
        max_events: int,
        step: int = 5000,
    ) -> int:
        """Delete one bounded step of a stream's expired events (older than `max_age_s`, or
        beyond its newest `max_events`; 0 = no such limit) with their keys, oldest first;
        returns how many went (0: nothing more to do now)."""
        with conn.cursor() as cur:
            cutoff = -1  # with a count limit: every id up to this one is beyond it
            if max_events:
                cur.execute(
                    "SELECT id FROM events WHERE stream = %s ORDER BY id DESC OFFSET %s LIMIT 1",
                    (stream, max_events),
                )
                row = cur.fetchone()
                cutoff = row[0] if row else -1
            cur.execute(
                "WITH page AS (SELECT id FROM events WHERE stream = %s ORDER BY id LIMIT %s) "
                "DELETE FROM events e USING page WHERE e.stream = %s AND e.id = page.id AND "
                "(e.id <= %s OR (%s > 0 AND e.created_at < now() - make_interval(secs => %s))) "
                "RETURNING e.id, e.client_id, e.key",
                (stream, step, stream, cutoff, max_age_s, float(max_age_s)),
            )
            gone = cur.fetchall()
            keyed = [(c, k) for _, c, k in gone if k is not None]
            if keyed:
                cur.execute(
                    "DELETE FROM event_keys WHERE (client_id, key) IN "
                    "(SELECT * FROM unnest(%s::text[], %s::text[]))",
                    ([c for c, _ in keyed], [k for _, k in keyed]),
                )
            if gone:
                cur.execute(
                    "UPDATE streams SET pruned_upto = GREATEST(pruned_upto, %s) WHERE name = %s",
                    (max(r[0] for r in gone), stream),
                )
            elif max_events:
                cur.execute("UPDATE streams SET count_checked_id = last_id WHERE name = %s", (stream,))
        return len(gone)
