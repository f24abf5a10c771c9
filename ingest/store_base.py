"""What the event store's parts share: the SQL statements, the slice and key records, the
transaction helper and the errors a write raises (ingest/store.py composes the parts)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg2
import psycopg2.errors
import psycopg2.extensions

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x511CE  # pg advisory lock key held while migrating
SLICE_LOCK = 0x511CF  # held while creating slices
PRUNE_LOCK = 0x511D0  # held by the one process pruning right now
SLICE_WIDTH = 1_000_000  # positions per slice (STORAGE_SLICE_POSITIONS)


@dataclass(frozen=True, slots=True)
class Slice:
    """One partition of `events`: the positions [lo, hi)."""

    name: str
    lo: int
    hi: int


# The events already stored under some (client, key) pairs, with what the key promised. A key
# names its event by position (`id`, keys from before key batches) or by its batch's ticket and
# its place in the batch.
SQL_EXISTING_KEYS = (
    "SELECT k.client_id, k.key, x.id, k.stream, e.type, e.data FROM event_keys k "
    "JOIN json_to_recordset(%s::json) AS q(c text, k text) "
    "ON k.client_id = q.c AND k.key = q.k "
    "LEFT JOIN key_batches b ON b.ticket = k.ticket "
    "CROSS JOIN LATERAL (SELECT COALESCE(k.id, b.first + k.place) AS id) x "
    "LEFT JOIN events e ON e.id = x.id"
)
SQL_KEY_POSITION = (
    "SELECT COALESCE(k.id, b.first + k.place) FROM event_keys k "
    "LEFT JOIN key_batches b ON b.ticket = k.ticket WHERE k.client_id = %s AND k.key = %s"
)
# A batch's new keys, claimed before the position lock in the batch's transaction: a ticket for
# the batch, then the keys in (client, key) order, so two batches claiming the same keys wait for
# each other in one order and never deadlock. A key stored meanwhile, or being stored by a batch
# in flight (the insert waits for it to end), fails the primary key: the batch is then planned
# again from a fresh lookup. Nothing that holds the position lock ever waits for a key.
SQL_CLAIM_KEYS = (
    "SELECT nextval('key_batch_tickets'); "
    "INSERT INTO event_keys (client_id, key, ticket, place, stream) "
    "SELECT j.c, j.k, currval('key_batch_tickets'), j.i, j.s "
    "FROM json_to_recordset(%s::json) AS j(c text, k text, i integer, s text) ORDER BY j.c, j.k"
)
# `rekey` (the Mercure door): keys that move to this batch's new event, each only if it still
# names the event the lookup saw (else another batch moved it meanwhile: planned again).
SQL_MOVE_KEYS = (
    "UPDATE event_keys k SET id = NULL, ticket = currval('key_batch_tickets'), place = j.i, "
    "stream = j.s FROM (SELECT * FROM json_to_recordset(%s::json) "
    "AS q(c text, k text, i integer, s text, e bigint) ORDER BY q.c, q.k) j "
    "WHERE k.client_id = j.c AND k.key = j.k AND COALESCE(k.id, "
    "(SELECT b.first FROM key_batches b WHERE b.ticket = k.ticket) + k.place) = j.e RETURNING 1"
)
# The serial section: advance the position counter (its row lock is held until the COMMIT, so
# ids are handed out in commit order), then the events at the positions reserved (rows carry
# their place in the batch, 1..n), the batch's row that its claimed keys name ({key_batch}), and
# each stream's newest position. The rows are parsed once. The COMMIT follows in the same round
# trip, so the lock is held for Postgres's own work only, never across a round trip or the
# Python that planned the rows. The first position travels out through a session setting, read
# after the COMMIT.
SQL_WRITE_ROWS = (
    "WITH p AS (UPDATE sluice_position SET last = last + %s RETURNING last - %s AS first), "
    "r AS MATERIALIZED (SELECT p.first + j.i AS i, j.s, j.t, j.d, j.c, j.k FROM p "
    "CROSS JOIN json_to_recordset(%s::json) AS j(i bigint, s text, t text, d text, c text, k text)), "
    "e AS (INSERT INTO events (id, stream, type, data, client_id, key) "
    "SELECT i, s, t, d, c, k FROM r), {key_batch}"
    "u AS (INSERT INTO streams (name, last_id, pruned_upto) "
    "SELECT g.s, g.l, COALESCE(t.deleted_upto, 0) FROM (SELECT s, max(i) AS l FROM r GROUP BY s) g "
    "LEFT JOIN stream_tombstones t ON t.name = g.s "
    "ON CONFLICT (name) DO UPDATE SET last_id = GREATEST(streams.last_id, EXCLUDED.last_id)) "
    "SELECT set_config('sluice.batch_first', first::text, false) FROM p; "
    "COMMIT; "
    "SELECT current_setting('sluice.batch_first')::bigint"
)
SQL_KEY_BATCH = (
    "b AS (INSERT INTO key_batches (ticket, first, upto) "
    "SELECT currval('key_batch_tickets'), first, first + %s FROM p), "
)
SQL_FINISH = SQL_WRITE_ROWS.format(key_batch="")  # no keys claimed
SQL_FINISH_KEYED = SQL_WRITE_ROWS.format(key_batch=SQL_KEY_BATCH)
KEY_RACE_ATTEMPTS = 5  # plans of one batch beyond one per key (see `write_batch`)
# One stream's page: an index range scan on (stream, id) in each slice, in slice order.
SQL_STREAM_PAGE = "SELECT {cols} FROM events WHERE stream = %s AND id > %s AND id <= %s ORDER BY id LIMIT %s"
# Several streams: one such range per stream (LATERAL), then the pages merged by position; the
# sort sees at most streams x limit rows, never a stream's whole history.
SQL_STREAMS_PAGE = (
    "SELECT p.* FROM unnest(%s::text[]) AS s(name) CROSS JOIN LATERAL ("
    " SELECT {cols} FROM events e WHERE e.stream = s.name AND e.id > %s AND e.id <= %s"
    " ORDER BY e.id LIMIT %s) AS p ORDER BY p.id LIMIT %s"
)
# The planner cannot estimate a GIN `?|` on an expression and walks the stream in id order instead:
# the topic index (a bitmap scan) is always the right path: it returns only the updates naming a topic.
SQL_TOPICS_PLAN = "SET LOCAL enable_seqscan = off; SET LOCAL enable_indexscan = off"
# Several streams of one client: one range per stream on (stream, id), the client a filter
# (`|| ''` keeps the planner off (client_id, id), which would walk the client's whole history,
# streams the reader may not see included).
SQL_STREAMS_CLIENT_PAGE = (
    "SELECT p.* FROM unnest(%s::text[]) AS s(name) CROSS JOIN LATERAL ("
    " SELECT {cols} FROM events e WHERE e.stream = s.name AND e.client_id || '' = %s"
    " AND e.id > %s AND e.id <= %s ORDER BY e.id LIMIT %s) AS p ORDER BY p.id LIMIT %s"
)
# A deleted stream's events, and the keys that name them: found through the events' rows, so
# the cost follows the stream's own history, never the whole key table.
SQL_DELETE_STREAM_EVENTS = (
    "WITH gone AS (DELETE FROM events WHERE stream = %s RETURNING client_id, key) "
    "DELETE FROM event_keys k USING gone g "
    "WHERE g.key IS NOT NULL AND k.client_id = g.client_id AND k.key = g.key AND k.stream = %s"
)
# A dropped slice's keys that name a key batch, found through the slice's own events (one range
# of positions per step) and removed only if they still name that event (not moved since).
SQL_DROP_BATCH_KEYS = (
    "DELETE FROM event_keys k USING {slice} e, key_batches b "
    "WHERE e.id >= %s AND e.id < %s AND e.key IS NOT NULL AND NOT e.stream = ANY(%s) "
    "AND k.client_id = e.client_id AND k.key = e.key AND b.ticket = k.ticket "
    "AND b.first + k.place = e.id"
)
UPTO_MAX = 2**63 - 1
SQL_COMMIT = "COMMIT"
SQL_ROLLBACK = "ROLLBACK"
_EVENT_COLUMNS = (
    "id, stream, type, data, client_id, key, "
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created"
)


@contextmanager
def _transaction(conn: psycopg2.extensions.connection) -> Iterator[psycopg2.extensions.cursor]:
    """BEGIN ... COMMIT on an autocommit connection; ROLLBACK if the block raises."""
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        try:
            yield cur
            cur.execute(SQL_COMMIT)
        except BaseException:
            if not conn.closed:
                cur.execute(SQL_ROLLBACK)
            raise


@dataclass(slots=True)
class KeyedEvent:
    """What an idempotency key stands for: the event stored (or being stored) under it."""

    id: int
    stream: str
    type: str | None
    data: str | None

    def same_event(self, stream: str, event_type: str, data: str) -> bool:
        """The same stream, type and data (as JSON values: key order does not matter)."""
        if self.type is None or self.data is None:  # its row is being pruned: judge by stream
            return self.stream == stream
        if self.stream != stream or self.type != event_type:
            return False
        return self.data == data or orjson.loads(self.data) == orjson.loads(data)


class ReservationFailed(Exception):
    """The first statement of a batch failed: nothing was sent that could have committed."""


class KeyRaced(Exception):
    """A key the batch meant to move was moved by another batch meanwhile: plan it again."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A batch planned and its keys claimed, its transaction open: what `finish` writes."""

    total: int  # positions it takes
    rows: str  # its new events as one JSON text
    keyed: bool  # it claimed keys: its key batch row is due
