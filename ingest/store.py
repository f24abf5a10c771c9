"""The Postgres event store: it owns the schema, the migrations and every SQL statement.

Writes happen in batches, one transaction each. psycopg2 refuses COPY under gevent's wait
callback, so a batch's rows travel as one JSON array parameter that Postgres expands with
`json_to_recordset` (measured here: ~60k rows/s, against ~51k for `json_array_elements` and
~38k for `unnest` of arrays).
Event data travels as a JSON *string* holding its encoded form, because Postgres's JSON parser
rejects a `\u0000` escape anywhere it walks; de-escaping the outer string yields the encoded
text unchanged.

Each batch advances the single-row position counter in the statement that writes it; the
counter's row lock is held until COMMIT, so ids are handed out in commit order across all streams
and all processes. That lock is the one serial section of every write, so a batch does what it
can before it (`prepare`): it opens its transaction, decides every event's fate and claims its
new idempotency keys in the key table, whose primary key makes the check race-free (a key stored
meanwhile fails it, and the batch is planned again from a fresh lookup). A claimed key cannot
know its event's position yet: it names its batch's ticket and its place in the batch. Then one
statement (`finish`) takes the lock and writes the events, the batch's ticket row (ticket to
first position) and the streams' newest positions, with the COMMIT in the same round trip.
Nothing that holds the lock ever waits for a key.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import psycopg2.errors
import psycopg2.extensions

from common.problems import Problem
from ingest.events import IngestRequest, StoredEvent, Written

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


class EventStore:
    """SQL for events and streams; every method takes a borrowed connection. Holds only the
    storage slice width (positions per partition)."""

    def __init__(self, slice_width: int = SLICE_WIDTH) -> None:
        self.slice_width = slice_width

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

    # -- writes -------------------------------------------------------------------------------
    def lookup_keys(
        self, conn: psycopg2.extensions.connection, requests: Sequence[IngestRequest]
    ) -> dict[tuple[str, str], KeyedEvent]:
        """The events already stored under the batch's keys, looked up without the lock (for
        `write_batch(known=...)`, while another batch holds it)."""
        with conn.cursor() as cur:
            return self._existing_keys(cur, requests)

    def write_batch(
        self,
        conn: psycopg2.extensions.connection,
        requests: Sequence[IngestRequest],
        known: dict[tuple[str, str], KeyedEvent] | None = None,
        prepared: Prepared | None = None,
        *,
        before_prepare: Callable[[], None] | None = None,
        after_prepare: Callable[[], None] | None = None,
    ) -> tuple[int, int]:
        """Commit every event of `requests` in one transaction and fill in their results.

        Returns the reserved position range (after, upto]: the position before and after. A
        request whose key repeats a different event is refused (`req.error`, 422) and writes
        nothing; the others commit.

        Raises ReservationFailed if the very first round trip failed (safe to retry on another
        connection); any later failure leaves the outcome to the transaction (all or nothing).
        A batch whose positions run past the last slice creates the slice and is written again.

        `known`: the batch's stored keys as taken earlier (from `lookup_keys`, or `{}` to assume
        none); None looks them up now. Either way the batch's new keys are claimed before the
        position lock (`prepare`); a stored key missing from `known` (stored by another batch in
        between, or never looked up) fails the claim, and the batch is planned again from a
        fresh lookup (nothing of the first try commits). `rekey` batches always look keys up.
        `prepared`: this batch, already prepared on this connection (its transaction open).
        `before_prepare` and `after_prepare` are called around each time its keys are claimed
        (the batcher's pipeline needs to know, see `ingest.batcher.Flight`).
        """
        if any(r.rekey for r in requests):
            known = None  # moving a key needs what it names now
        # A raced plan means another batch stored one of this batch's keys, which the next plan
        # finds stored: so each of its distinct keys can race it once at most (unless keys are
        # dropped meanwhile). A fixed bound would give up, under heavy overlap, on a batch that
        # the next plan would write; so once the fixed bound is spent, it grows by the keys.
        attempts = KEY_RACE_ATTEMPTS
        attempt = 0
        while attempt < attempts:
            attempt += 1
            try:
                if prepared is None:
                    if before_prepare is not None:
                        before_prepare()
                    prepared = self.prepare(conn, requests, known)
                    if after_prepare is not None:
                        after_prepare()
                return self.finish(conn, requests, prepared)
            except (psycopg2.errors.UniqueViolation, psycopg2.errors.DeadlockDetected, KeyRaced):
                if attempt == KEY_RACE_ATTEMPTS:
                    attempts += len(
                        {(r.client_id, ev.key) for r in requests for ev in r.events if ev.key is not None}
                    )
                if attempt == attempts:
                    raise  # keys stored under it again and again: let the batcher isolate it
            except psycopg2.errors.CheckViolation as exc:
                if "no partition" not in str(exc):
                    raise
                with conn.cursor() as cur:
                    cur.execute("SELECT last FROM sluice_position")
                    last = cur.fetchone()[0]
                total = sum(len(r.events) for r in requests)
                self.ensure_slices(conn, last + total, self.slice_width)
            prepared, known = None, None
        raise AssertionError("unreachable")

    def prepare(
        self,
        conn: psycopg2.extensions.connection,
        requests: Sequence[IngestRequest],
        known: dict[tuple[str, str], KeyedEvent] | None = None,
    ) -> Prepared:
        """Open the batch's transaction, decide every event's fate (the stored keys as `known`,
        or looked up now) and claim its new keys: all without the position lock, so a batch can
        be prepared while another one is written. `finish` then writes it.

        Raises ReservationFailed if the first round trip failed; UniqueViolation, KeyRaced or
        DeadlockDetected if another batch stored one of its keys meanwhile. On any failure the
        transaction is rolled back and the requests' results cleared."""
        total = sum(len(r.events) for r in requests)
        cur = conn.cursor()
        begun = False

        def trip(sql: str, params: tuple[Any, ...] = ()) -> None:
            nonlocal begun
            if begun:
                cur.execute(sql, params)
                return
            try:  # nothing that can commit is sent before this round trip succeeds
                cur.execute(f"BEGIN; {sql}" if sql else "BEGIN", params or None)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                raise ReservationFailed(str(exc)) from exc
            begun = True

        try:
            try:
                if known is None:
                    existing = self._existing_keys(cur, requests, trip)
                else:
                    existing = dict(known)
                stored = {key: seen.id for key, seen in existing.items()}
                rows = self._plan_rows(requests, existing)
                claims: dict[tuple[str, str], dict[str, Any]] = {}
                for row in rows:  # a key named twice (a `rekey` move) names its last event
                    if row["k"] is not None:
                        claims[(row["c"], row["k"])] = {
                            "c": row["c"],
                            "k": row["k"],
                            "i": row["i"],
                            "s": row["s"],
                        }
                new = [c for key, c in claims.items() if key not in stored]
                moves = [{**c, "e": stored[key]} for key, c in claims.items() if key in stored]
                if claims:
                    trip(SQL_CLAIM_KEYS, (orjson.dumps(new).decode(),))
                if moves:
                    cur.execute(SQL_MOVE_KEYS, (orjson.dumps(moves).decode(),))
                    if len(cur.fetchall()) != len(moves):
                        raise KeyRaced("a key moved meanwhile")
                if not begun:
                    trip("")
            except BaseException:
                self._abandon(conn, cur, requests)
                raise
        finally:
            cur.close()
        return Prepared(total, orjson.dumps(rows).decode(), bool(claims))

    def finish(
        self, conn: psycopg2.extensions.connection, requests: Sequence[IngestRequest], prepared: Prepared
    ) -> tuple[int, int]:
        """The serial section: take the position lock, write the prepared batch's events, its
        key batch row and its streams, and COMMIT, in one round trip."""
        total = prepared.total
        params: tuple[Any, ...] = (total, total, prepared.rows)
        cur = conn.cursor()
        try:
            try:
                cur.execute(
                    self._write_sql(keyed=prepared.keyed), params + (total,) if prepared.keyed else params
                )
                first = cur.fetchone()[0]
            except BaseException:
                self._abandon(conn, cur, requests)
                raise
        finally:
            cur.close()
        for r in requests:  # the batch's own positions were counted from 1: now they are known
            for w in r.results or ():
                if w.id < 0:
                    w.id = first - w.id
        return first, first + total

    @staticmethod
    def _abandon(
        conn: psycopg2.extensions.connection,
        cur: psycopg2.extensions.cursor,
        requests: Sequence[IngestRequest],
    ) -> None:
        """Roll the batch's transaction back and forget what was planned for its requests."""
        if not conn.closed:
            try:
                cur.execute(SQL_ROLLBACK)
            except psycopg2.Error:
                pass
        for r in requests:
            r.results = None
            r.error = None

    def _write_sql(self, *, keyed: bool) -> str:
        """The serial statement: with the row of a batch that claimed keys, or without."""
        return SQL_FINISH_KEYED if keyed else SQL_FINISH

    def _plan_rows(
        self, requests: Sequence[IngestRequest], existing: dict[tuple[str, str], KeyedEvent]
    ) -> list[dict[str, Any]]:
        """Decide each event's fate before any position is taken: a repeated key's original
        id, a refused request's error, or the next place in the batch. Results name the batch's
        n-th new event -n until the statement says where the batch starts."""
        place = 0
        rows: list[dict[str, Any]] = []
        for req in requests:
            conflict = self._foreign_key(req, existing) if req.rekey else self._key_conflict(req, existing)
            if conflict is not None:
                req.error = conflict
                req.results = None
                continue
            results: list[Written] = []
            client = req.client_id
            for ev in req.events:
                if ev.key is not None:
                    seen = existing.get((client, ev.key))
                    if seen is not None and (not req.rekey or seen.same_event(ev.stream, ev.type, ev.data)):
                        results.append(Written(seen.id, seen.stream, ev.key, duplicate=True))
                        continue
                place += 1
                if ev.key is not None:
                    # A later event in this same batch with the same key repeats this one.
                    existing[(client, ev.key)] = KeyedEvent(-place, ev.stream, ev.type, ev.data)
                results.append(Written(-place, ev.stream, ev.key))
                rows.append(
                    {"i": place, "s": ev.stream, "t": ev.type, "d": ev.data, "c": client, "k": ev.key}
                )
            req.results = results
        return rows

    @staticmethod
    def _foreign_key(req: IngestRequest, existing: dict[tuple[str, str], KeyedEvent]) -> Problem | None:
        """409 if a `rekey` request with an owner would move a key that names another owner's
        event (or one stored before owners were: it cannot be told apart from another's)."""
        if req.owner is None:
            return None
        for ev in req.events:
            seen = existing.get((req.client_id, ev.key)) if ev.key is not None else None
            if seen is None or seen.same_event(ev.stream, ev.type, ev.data):
                continue
            try:
                doc = orjson.loads(seen.data) if seen.data is not None else None
            except orjson.JSONDecodeError:
                doc = None
            owner = doc.get("publisher") if isinstance(doc, dict) else None
            if owner is None or owner != req.owner:
                return Problem(
                    409,
                    "id-in-use",
                    f"the id `{ev.key}` names another publisher's update; choose another id",
                    key=ev.key,
                )
        return None

    @staticmethod
    def _key_conflict(req: IngestRequest, existing: dict[tuple[str, str], KeyedEvent]) -> Problem | None:
        """422 if any key of the request names a different event than it did before (another
        stream, type or data; the IETF Idempotency-Key draft's rule), else None."""
        client = req.client_id
        keys = [ev.key for ev in req.events if ev.key is not None]
        if len(set(keys)) == len(keys) and existing.keys().isdisjoint([(client, k) for k in keys]):
            return None  # every key is new and used once: nothing to compare
        mine: dict[str, KeyedEvent] = {}
        for ev in req.events:
            if ev.key is None:
                continue
            seen = existing.get((client, ev.key)) or mine.get(ev.key)
            if seen is not None and not seen.same_event(ev.stream, ev.type, ev.data):
                return Problem(
                    422,
                    "idempotency-key-reused",
                    f"key `{ev.key}` was used for a different event (stream "
                    f"`{seen.stream}`); use a new key for a new event",
                    key=ev.key,
                )
            mine.setdefault(ev.key, KeyedEvent(0, ev.stream, ev.type, ev.data))
        return None

    def _existing_keys(
        self,
        cur: psycopg2.extensions.cursor,
        requests: Sequence[IngestRequest],
        trip: Callable[[str, tuple[Any, ...]], None] | None = None,
    ) -> dict[tuple[str, str], KeyedEvent]:
        keys = [
            {"c": req.client_id, "k": ev.key} for req in requests for ev in req.events if ev.key is not None
        ]
        if not keys:
            return {}
        params = (orjson.dumps(keys).decode(),)
        if trip is None:
            cur.execute(SQL_EXISTING_KEYS, params)
        else:
            trip(SQL_EXISTING_KEYS, params)
        return {(c, k): KeyedEvent(i, s, t, d) for c, k, i, s, t, d in cur.fetchall()}

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

    def key_position(self, conn: psycopg2.extensions.connection, client_id: str, key: str) -> int | None:
        """The position of the event stored under an idempotency key, if it is still kept."""
        with conn.cursor() as cur:
            cur.execute(SQL_KEY_POSITION, (client_id, key))
            row = cur.fetchone()
        return None if row is None else int(row[0])

    def last_position(self, conn: psycopg2.extensions.connection) -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT last FROM sluice_position")
            return cur.fetchone()[0]

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
