"""The storage layout for days, on real Postgres: every read shape is an index range scan that
stops after a page (EXPLAIN says so at 300,000 rows over several slices), and migration 0002
converts a 0001 database without losing an event or a key."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg2
import pytest

from ingest.pool import Pool
from ingest.store import MIGRATIONS_DIR, SQL_DELETE_STREAM_EVENTS, SQL_TOPICS_PLAN, EventStore
from tests.helpers import admin_execute, ingest_request, with_database

ROWS = 300_000
WIDTH = 50_000


@pytest.fixture(scope="module")
def big_db(pg_admin_url):
    """300,000 events over 1,000 streams and 10 clients in six slices, a third of them keyed,
    analyzed."""
    name = "layout_plans"
    admin_execute(pg_admin_url, f"DROP DATABASE IF EXISTS {name}")
    admin_execute(pg_admin_url, f"CREATE DATABASE {name}")
    url = with_database(pg_admin_url, name)
    pool = Pool(url, 1, timeout_s=30)
    store = EventStore(WIDTH)
    with pool.connection() as conn:
        store.migrate(conn)
        store.ensure_slices(conn, ROWS + 1)
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO events (id, stream, type, data, client_id, key) SELECT g, "
                "'s/' || (g %% 1000), 'message', '{\"n\":1}', 'c' || (g %% 10), "
                "CASE WHEN g %% 3 = 0 THEN 'k' || g END "
                "FROM generate_series(1, %s) g",
                (ROWS,),
            )
            cur.execute(
                "INSERT INTO event_keys (client_id, key, id, stream) "
                "SELECT client_id, key, id, stream FROM events WHERE key IS NOT NULL"
            )
            cur.execute("UPDATE sluice_position SET last = %s", (ROWS,))
            cur.execute(
                "INSERT INTO streams (name, last_id) SELECT 's/' || g, 0 FROM generate_series(0, 999) g"
            )
            cur.execute("ANALYZE events")
            cur.execute("ANALYZE event_keys")
    yield pool, store
    pool.close()


def plan(pool: Pool, store: EventStore, **query: Any) -> dict[str, Any]:
    sql, params = store.read_query(**query)
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        return cur.fetchone()[0][0]["Plan"]


def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node.get("Plans", ()):
        out += nodes(child)
    return out


def event_scans(root: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in nodes(root) if n.get("Relation Name", "").startswith("events")]


@pytest.mark.parametrize("streams", [["s/7"], ["s/1", "s/2", "s/3"], [f"s/{i}" for i in range(50)]])
@pytest.mark.parametrize("upto", [None, ROWS // 2])
def test_stream_pages_are_index_ranges_merged_by_position(big_db, streams, upto):
    pool, store = big_db
    root = plan(pool, store, after=1000, limit=500, streams=streams, upto=upto)
    scans = event_scans(root)
    assert scans, root
    for scan in scans:
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), scan["Node Type"]
        assert "stream" in scan["Index Name"] and "stream" in scan["Index Cond"], scan
        assert "stream" not in scan.get("Filter", "")  # never a walk filtered on stream
    sorts = [n for n in nodes(root) if n["Node Type"] in ("Sort", "Incremental Sort")]
    if len(streams) == 1:
        assert sorts == []  # one stream: its index gives the order
    else:
        # Only the merge of the per-stream pages (each LIMITed) is sorted, never a stream.
        assert len(sorts) == 1 and sorts[0]["Plans"][0]["Node Type"] == "Nested Loop"


def test_client_and_position_reads_are_index_ranges(big_db):
    pool, store = big_db
    for query, index in ((dict(client_id="c3"), "client"), (dict(upto=ROWS), "id")):
        root = plan(pool, store, after=1000, limit=500, **query)
        assert not [n for n in nodes(root) if n["Node Type"] in ("Sort", "Seq Scan")], root
        for scan in event_scans(root):
            assert scan["Node Type"] in ("Index Scan", "Index Only Scan")
            assert index in scan["Index Name"], scan


def test_a_read_by_client_within_a_grant_costs_what_the_grant_covers(big_db):
    """31.6: client c3 wrote 30,000 events, none in s/4 or s/5; a reader granted only those
    two streams reads by client c3: an index range per granted stream (their 600 rows at
    most), never c3's whole history."""
    pool, _ = big_db
    from auth.grants import Grants
    from ingest.batcher import Batcher
    from ingest.reads import read_history

    class Recording(EventStore):  # the real store; it keeps the statements it builds
        queries: list = []

        def read_query(self, **query):
            built = super().read_query(**query)
            self.queries.append(built)
            return built

    store = Recording(WIDTH)
    page = read_history(
        store,
        pool,
        Batcher(store, pool),
        Grants(["s/4", "s/5"]),
        client_id="c3",
        stream=None,
        after=0,
        limit=100,
    )
    assert page.events == [] and len(store.queries) == 1
    sql, params = store.queries[0]
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        root = cur.fetchone()[0][0]["Plan"]
        cur.execute(sql, params)
        assert cur.fetchall() == []
    scans = event_scans(root)
    assert scans and all(
        "stream" in scan.get("Index Name", "") or scan["Plan Rows"] <= 1 for scan in scans
    ), scans  # (empty slices aside)
    read = sum(
        (n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0)) * n.get("Actual Loops", 1)
        for n in scans
    )
    assert read <= 2 * ROWS // 1000, read  # the two streams' own rows, not c3's 30,000


def test_a_read_by_client_within_a_grant_of_too_many_streams_is_refused(big_db):
    from auth.grants import Grants
    from common.problems import Problem
    from ingest.batcher import Batcher
    from ingest.reads import READ_BY_CLIENT_MAX_STREAMS, read_history

    pool, store = big_db
    assert READ_BY_CLIENT_MAX_STREAMS == 1000
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO streams (name, last_id) VALUES ('s/extra', 0)")
    try:
        with pytest.raises(Problem) as info:  # s/* now covers 1,001 streams
            read_history(
                store,
                pool,
                Batcher(store, pool),
                Grants(["s/*"]),
                client_id="c3",
                stream=None,
                after=0,
                limit=10,
            )
        assert info.value.status == 400 and info.value.slug == "grant-too-wide"
    finally:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM streams WHERE name = 's/extra'")


def test_a_mercure_resume_on_exact_topics_reads_only_the_updates_naming_them(big_db):
    """31.8: 30,000 Mercure updates over 100 topics; a resume on a topic none names reads
    nothing, and one on a topic reads that topic's updates, through the topic index."""
    pool, store = big_db
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO events (id, stream, type, data, client_id) SELECT %s + g, "
            "'.mercure', 'message', json_build_object('topics', json_build_array("
            "'https://ex.net/t/' || (g %% 100)), 'data', 'x')::text, 'mercure' "
            "FROM generate_series(1, 30000) g",
            (ROWS,),
        )
        cur.execute("ANALYZE events")
    try:
        for topics, expected in ((["https://ex.net/none"], 0), (["https://ex.net/t/7"], 300)):
            params = (".mercure", topics, 0, ROWS + 30_000, 1000)
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute(SQL_TOPICS_PLAN)  # as read_with_topics runs it
                cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + store.topics_query(".mercure"), params)
                root = cur.fetchone()[0][0]["Plan"]
                cur.execute("ROLLBACK")
                rows = store.read_with_topics(
                    conn, ".mercure", topics, after=0, upto=ROWS + 30_000, limit=1000
                )
            assert len(rows) == expected
            bitmap = [n for n in nodes(root) if n["Node Type"] == "Bitmap Index Scan"]
            assert bitmap and all(n["Index Cond"].find("topics") >= 0 for n in bitmap), root
            assert all(n["Actual Rows"] == 0 for n in event_scans(root) if n["Node Type"] == "Seq Scan"), (
                root
            )  # empty slices aside
            heap = sum(
                n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0) for n in event_scans(root)
            )
            assert heap <= expected, heap  # the matching updates, never the 30,000
    finally:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM events WHERE stream = '.mercure'")


def test_deleting_a_stream_finds_its_keys_through_its_own_events(big_db):
    """The key table holds every kept key: a stream's delete must not walk it."""
    pool, store = big_db
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN (FORMAT JSON) " + SQL_DELETE_STREAM_EVENTS, ("s/5", "s/5"))
        root = cur.fetchone()[0][0]["Plan"]
    keys = [
        n for n in nodes(root) if n.get("Relation Name") == "event_keys" and n["Node Type"] != "ModifyTable"
    ]
    assert keys and all(
        n["Node Type"] == "Index Scan" and n["Index Name"] == "event_keys_pkey" for n in keys
    ), keys
    for scan in [n for n in event_scans(root) if n["Node Type"] != "ModifyTable"]:
        # the stream's events by its index (empty slices aside)
        assert scan["Node Type"] == "Index Scan" or scan["Plan Rows"] <= 1, scan


def test_pages_read_only_what_they_return(big_db):
    """With ANALYZE: a page of one stream near the end of 300,000 rows touches a page of rows."""
    pool, store = big_db
    sql, params = store.read_query(after=ROWS - 20_000, limit=10, streams=["s/5"])
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        root = cur.fetchone()[0][0]["Plan"]
    read = sum(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) for n in event_scans(root))
    assert read <= 10, read


def test_migration_0002_converts_a_0001_database(pg_admin_url):
    name = "layout_migrate"
    admin_execute(pg_admin_url, f"DROP DATABASE IF EXISTS {name}")
    admin_execute(pg_admin_url, f"CREATE DATABASE {name}")
    url = with_database(pg_admin_url, name)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:  # a database as version 0001 left it, with history and keys
        cur.execute(
            "CREATE TABLE sluice_migrations (version text PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute((MIGRATIONS_DIR / "0001_events.sql").read_text())
        cur.execute("INSERT INTO sluice_migrations (version) VALUES ('0001_events')")
        cur.execute(
            "INSERT INTO events (id, stream, type, data, client_id, key) SELECT g, "
            "'old/' || (g % 3), 'message', g::text, 'c', CASE WHEN g % 2 = 0 THEN "
            "'key' || g END FROM generate_series(1, 1000) g"
        )
        cur.execute(
            "INSERT INTO streams (name, last_id) VALUES ('old/0', 999), ('old/1', 1000), ('old/2', 998)"
        )
        cur.execute("UPDATE sluice_position SET last = 1000")
    conn.close()

    pool = Pool(url, 1, timeout_s=30)
    store = EventStore(100)
    with pool.connection() as conn:
        assert store.migrate(conn) == [
            "0002_slices",
            "0003_key_batches",
            "0004_revocations",
            "0005_mercure_topics",
        ]
        rows = store.read_events(conn, after=0, limit=2000)
        assert [r.id for r in rows] == list(range(1, 1001))
        assert [r.data for r in rows[:3]] == ["1", "2", "3"]
        assert store.read_events(conn, after=0, limit=5, streams=["old/1"])[0].id == 1
        # Keys survived: the same key and event is a duplicate; a new event gets the next id.
        again = ingest_request(client="c", stream="old/2", key="key2")
        again.events[0].data = "2"
        fresh = ingest_request(client="c", stream="new", key="k-new")
        after, upto = store.write_batch(conn, [again, fresh])
        assert again.results[0].duplicate and again.results[0].id == 2
        assert fresh.results[0].id == 1001 and (after, upto) == (1000, 1002)
        clash = ingest_request(client="c", stream="elsewhere", key="key4")
        store.write_batch(conn, [clash])
        assert clash.error is not None and clash.error.status == 422
        assert [s.name for s in store.slices(conn)][0] == "events_legacy"
        assert store.describe_stream(conn, "old/1")["oldest"] == "1"
    pool.close()


def test_a_batch_past_the_last_slice_creates_its_slice(database_url):
    pool = Pool(database_url, 1, timeout_s=10)
    store = EventStore(7)
    with pool.connection() as conn:
        before = len(store.slices(conn))
        r = ingest_request(n=20, stream="wide")
        store.write_batch(conn, [r])
        assert [w.id for w in r.results] == list(range(1, 21))
        assert len(store.slices(conn)) > before
        assert [e.id for e in store.read_events(conn, after=0, limit=50)] == list(range(1, 21))
        assert orjson.loads(store.read_events(conn, after=19, limit=1)[0].data) == 19
    pool.close()


def test_dropping_a_slice_forgets_its_keys_and_key_batches_and_keeps_the_rest(database_url):
    """Keys name their batch (ticket and place) and keys from before key batches their
    position: dropping a slice removes both kinds for its events and the key batches wholly
    below what is left, while keys of later slices and of a kept stream (compacted) still
    name their events."""
    pool = Pool(database_url, 1, timeout_s=10)
    store = EventStore(10)
    with pool.connection() as conn:
        old_style = ingest_request(stream="s", key="by-position")
        store.write_batch(conn, [old_style])
        with conn.cursor() as cur:  # as a key written before migration 0003 would be
            cur.execute(
                "UPDATE event_keys SET id = %s, ticket = NULL, place = NULL WHERE key = 'by-position'",
                (old_style.results[0].id,),
            )
        batches = [
            [ingest_request(stream="kept" if i == 3 else "s", key=f"k{i}-{j}") for j in range(4)]
            for i in range(6)
        ]
        for batch in batches:  # 24 events: positions 2..25 over slices of 10
            store.write_batch(conn, batch)
        cut = next(p.hi for p in store.slices(conn) if p.lo <= 20 < p.hi)
        for piece in [p for p in store.slices(conn) if p.hi <= cut]:  # oldest first
            store.drop_slice(conn, piece, keep=["kept"])
        held = store.slices(conn)[0].lo  # the compacted copy still holds its range
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FILTER (WHERE upto < %s), count(*) FROM key_batches", (held,))
            below, left = cur.fetchone()

        def position(key):
            return store.key_position(conn, "c", key)

        gone = [r for b in batches for r in b if r.results[0].id < cut and r.events[0].stream == "s"]
        assert gone and all(position(r.events[0].key) is None for r in gone)
        assert position("by-position") is None
        later = [r for b in batches for r in b if r.results[0].id >= cut]
        assert later and all(position(r.events[0].key) == r.results[0].id for r in later)
        kept = batches[3]  # positions 14..17: in a compacted copy of its slice
        assert all(r.results[0].id < cut and position(r.events[0].key) == r.results[0].id for r in kept)
        # The batches wholly below the oldest slice left are forgotten (the first three of the
        # seven), the others remain: the kept stream's keys still name theirs.
        assert held < cut and (below, left) == (0, 4)
    pool.close()
