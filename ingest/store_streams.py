"""The schema and the stream catalogue: migrations, streams, their retention overrides, deletes.

One part of EventStore (ingest/store.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from ingest.store_base import (
    MIGRATION_LOCK,
    MIGRATIONS_DIR,
    SQL_DELETE_STREAM_EVENTS,
    _transaction,
)


class Catalogue:
    """The schema and the stream catalogue: migrations, streams, their retention overrides, deletes."""

    slice_width: int

    # -- schema -------------------------------------------------------------------------------
    def migrate(self, conn: psycopg2.extensions.connection) -> list[str]:
        """Apply migrations not yet applied, under an advisory lock so processes do not race."""
        applied_now: list[str] = []
        with _transaction(conn) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS sluice_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT version FROM sluice_migrations")
            done = {row[0] for row in cur.fetchall()}
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                if path.stem in done:
                    continue
                cur.execute(path.read_text())
                cur.execute("INSERT INTO sluice_migrations (version) VALUES (%s)", (path.stem,))
                applied_now.append(path.stem)
        return applied_now

    # -- streams ------------------------------------------------------------------------------
    def create_stream(self, conn: psycopg2.extensions.connection, name: str) -> bool:
        """Create the stream if it does not exist; True if this call created it. A name that
        was deleted before starts with its history gone up to the deletion."""
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO streams (name, pruned_upto) SELECT %s, COALESCE("
                "(SELECT deleted_upto FROM stream_tombstones WHERE name = %s), 0) "
                "ON CONFLICT (name) DO NOTHING",
                (name, name),
            )
            return cur.rowcount == 1

    def set_retention(
        self, conn: psycopg2.extensions.connection, name: str, max_age_s: int | None, max_events: int | None
    ) -> None:
        """Set (or, with None, clear) a stream's retention overrides."""
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE streams SET retention_max_age_s = %s, retention_max_events = %s, "
                "count_checked_id = 0 WHERE name = %s",
                (max_age_s, max_events, name),
            )

    def describe_stream(self, conn: psycopg2.extensions.connection, name: str) -> dict[str, Any] | None:
        """The stream's row: name, last id, creation time, retention overrides, and the oldest
        position it still holds (None when it holds nothing)."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT name, last_id, to_char(created_at AT TIME ZONE 'UTC',"
                ' \'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\'), retention_max_age_s, retention_max_events,'
                " (SELECT id FROM events WHERE stream = %s ORDER BY id LIMIT 1)"
                " FROM streams WHERE name = %s",
                (name, name),
            )
            row = cur.fetchone()
        if row is None:
            return None
        return {
            "name": row[0],
            "lastId": str(row[1]) if row[1] else None,
            "createdAt": row[2],
            "retention": {"maxAgeS": row[3], "maxEvents": row[4]},
            "oldest": None if row[5] is None else str(row[5]),
        }

    def retention_overrides(
        self, conn: psycopg2.extensions.connection, names: Sequence[str]
    ) -> dict[str, tuple[int | None, int | None]]:
        """The streams' own retention settings (None: the default), for those that exist."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT name, retention_max_age_s, retention_max_events FROM streams WHERE name = ANY(%s)",
                (list(names),),
            )
            return {row[0]: (row[1], row[2]) for row in cur.fetchall()}

    def existing_streams(self, conn: psycopg2.extensions.connection, names: Sequence[str]) -> set[str]:
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM streams WHERE name = ANY(%s)", (list(names),))
            return {row[0] for row in cur.fetchall()}

    def streams_matching(self, conn: psycopg2.extensions.connection, regexes: Sequence[str]) -> list[str]:
        """The streams whose names match any of the regexes (pattern subscriptions' catch-up):
        a pass over the streams table, never over events."""
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM streams WHERE name ~ ANY(%s)", (list(regexes),))
            return [row[0] for row in cur.fetchall()]

    def delete_stream(self, conn: psycopg2.extensions.connection, name: str) -> bool:
        """Delete a stream, its history and its keys; True if it existed. Its name is
        remembered with the position, so a re-created stream says old history is gone.

        Takes the position lock so no batch writes to the stream halfway through the delete.
        Holding it, the delete may wait for a key that a `rekey` batch is moving while that
        batch waits for the lock: Postgres ends one of the two, and this one tries again.
        """
        for attempt in (1, 2, 3):
            try:
                return self._delete_stream(conn, name)
            except psycopg2.errors.DeadlockDetected:
                if attempt == 3:
                    raise
        raise AssertionError("unreachable")

    def _delete_stream(self, conn: psycopg2.extensions.connection, name: str) -> bool:
        with _transaction(conn) as cur:
            cur.execute("SELECT last FROM sluice_position FOR UPDATE")
            last = cur.fetchone()[0]
            cur.execute("DELETE FROM streams WHERE name = %s", (name,))
            existed = cur.rowcount == 1
            cur.execute(SQL_DELETE_STREAM_EVENTS, (name, name))
            if existed:
                cur.execute(
                    "INSERT INTO stream_tombstones (name, deleted_upto) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET deleted_upto = EXCLUDED.deleted_upto",
                    (name, last),
                )
        return existed

    def identity(self, conn: psycopg2.extensions.connection) -> str:
        """Names this database uniquely (cluster system id + database), for Redis channels."""
        with conn.cursor() as cur:
            cur.execute(
                "SELECT system_identifier::text || ':' || current_database() FROM pg_control_system()"
            )
            return cur.fetchone()[0]

    def ping(self, conn: psycopg2.extensions.connection) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
