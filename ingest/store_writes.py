"""Writing batches: planning, idempotency keys, the position counter's one serial statement.

One part of EventStore (ingest/store.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
import psycopg2
import psycopg2.errors
import psycopg2.extensions

from common.problems import Problem
from ingest.events import IngestRequest, Written
from ingest.store_base import (
    KEY_RACE_ATTEMPTS,
    SQL_CLAIM_KEYS,
    SQL_EXISTING_KEYS,
    SQL_FINISH,
    SQL_FINISH_KEYED,
    SQL_KEY_POSITION,
    SQL_MOVE_KEYS,
    SQL_ROLLBACK,
    KeyedEvent,
    KeyRaced,
    Prepared,
    ReservationFailed,
)
from ingest.store_retention import Retention


class Writes(Retention):
    """Writing batches: planning, idempotency keys, the position counter's one serial statement
    (a write past the last slice makes the next one: hence Retention)."""

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
