"""The event store and pool against a real Postgres: ids, idempotency, ordering, bounds."""
import random

import gevent
import psycopg2
import pytest

from ingest.pool import DatabaseUnavailable, Pool
from ingest.store import EventStore
from tests.helpers import ingest_request as req
from tests.helpers import wait_until


@pytest.fixture
def pool(database_url):
    p = Pool(database_url, 4, timeout_s=5)
    yield p
    p.close()


def write(pool, *requests):
    with pool.connection() as conn:
        EventStore().write_batch(conn, list(requests))
    return requests


def test_migrate_is_idempotent(pool):
    with pool.connection() as conn:
        assert EventStore().migrate(conn) == []  # the template is already migrated


def test_batch_ids_are_consecutive_in_request_order(pool):
    a, b = write(pool, req(n=3), req(n=2, stream="t"))
    ids = [w.id for w in a.results + b.results]
    assert ids == list(range(ids[0], ids[0] + 5))
    with pool.connection() as conn:
        rows = EventStore().read_events(conn, after=0, limit=10)
        assert [r.id for r in rows] == ids
        assert EventStore().describe_stream(conn, "t")["lastId"] == str(ids[-1])


def test_existing_key_returns_original(pool):
    (first,) = write(pool, req(key="k"))
    (second,) = write(pool, req(key="k"))
    assert second.results[0].duplicate and second.results[0].id == first.results[0].id
    with pool.connection() as conn:
        assert len(EventStore().read_events(conn, after=0, limit=10)) == 1


@pytest.mark.parametrize("looked_up_first", [False, True])
def test_a_key_repeated_later_in_the_same_batch_names_the_event_written_now(pool,
                                                                            looked_up_first):
    """Positions are taken inside the batch statement, after the duplicates were decided: the
    repeat must still carry the real id of the event its key names, on either path."""
    store = EventStore()
    plain, keyed, repeat = req(n=2), req(key="twice", stream="t"), req(key="twice", stream="t")
    with pool.connection() as conn:
        known = store.lookup_keys(conn, [keyed, repeat]) if looked_up_first else None
        after, upto = store.write_batch(conn, [plain, keyed, repeat], known)
        rows = store.read_events(conn, after=0, limit=10)
    assert upto - after == 4 and [w.id for w in plain.results] == [after + 1, after + 2]
    assert keyed.results[0].id == after + 3 and not keyed.results[0].duplicate
    assert repeat.results[0].duplicate and repeat.results[0].id == after + 3
    assert [(r.id, r.key) for r in rows] == [(after + 1, None), (after + 2, None),
                                             (after + 3, "twice")]


def test_keys_looked_up_before_the_lock_are_checked_again_when_one_raced_in(pool):
    """The pipelined batcher's path: keys looked up without the lock, then written. A key that
    another batch stored in between fails the plain insert, and the batch is written again
    the locked way: a duplicate of the event that won, nothing written twice, nothing lost."""
    store = EventStore()
    late = req(key="raced", n=1)
    other_new = req(key="fresh", n=1)
    with pool.connection() as conn:
        known = store.lookup_keys(conn, [late, other_new])
    assert known == {}
    (winner,) = write(pool, req(key="raced"))  # in between, from another batch
    with pool.connection() as conn:
        store.write_batch(conn, [late, other_new], known)
    assert late.results[0].duplicate and late.results[0].id == winner.results[0].id
    assert not other_new.results[0].duplicate
    with pool.connection() as conn:
        rows = store.read_events(conn, after=0, limit=10)
    assert sorted(r.key for r in rows) == ["fresh", "raced"]  # two events, each once
    # And without a race, keys known before the lock make the same decisions.
    again = req(key="fresh")
    brand_new = req(key="brand-new")
    with pool.connection() as conn:
        known = store.lookup_keys(conn, [again, brand_new])
        assert set(known) == {("c", "fresh")}
        store.write_batch(conn, [again, brand_new], known)
    assert again.results[0].duplicate and again.results[0].id == other_new.results[0].id
    assert not brand_new.results[0].duplicate
    with pool.connection() as conn:
        assert len(store.read_events(conn, after=0, limit=10)) == 3


def test_deleting_a_stream_forgets_its_keys_and_keeps_the_others(pool):
    store = EventStore()
    (gone,) = write(pool, req(key="k1", stream="doomed"))
    (kept,) = write(pool, req(key="k2", stream="kept"))
    with pool.connection() as conn:
        assert store.delete_stream(conn, "doomed")
        assert store.key_position(conn, "c", "k1") is None
        assert store.key_position(conn, "c", "k2") == kept.results[0].id
    (again,) = write(pool, req(key="k1", stream="doomed"))  # a new event now, not a repeat
    assert not again.results[0].duplicate and again.results[0].id > gone.results[0].id
    (repeat,) = write(pool, req(key="k2", stream="kept"))
    assert repeat.results[0].duplicate and repeat.results[0].id == kept.results[0].id


def test_unique_key_table_backs_idempotency(pool):
    write(pool, req(key="k"))
    with pool.connection() as conn, conn.cursor() as cur:
        with pytest.raises(psycopg2.IntegrityError):
            cur.execute("INSERT INTO event_keys (client_id, key, id, stream) "
                        "VALUES ('c', 'k', 999, 's')")


def test_commit_order_equals_id_order_under_concurrent_writers(database_url):
    """A reader tailing with `after=<last id seen>` must receive every event exactly once.

    Writers hold their transactions open for a random moment between taking ids and committing
    (a sleep inside the batch statement, after the counter's UPDATE); with ids from a plain
    sequence, a later id could commit first and the tail would skip the earlier one for good.
    """
    class SlowStore(EventStore):
        def _write_sql(self, *, locked):
            return super()._write_sql(locked=locked).replace(
                "SELECT set_config(", f"SELECT pg_sleep({random.uniform(0, 0.01):.4f}), set_config(")

    pool = Pool(database_url, 6, timeout_s=30)
    store = SlowStore()
    done = []

    def writer(w):
        for _i in range(30):
            with pool.connection() as conn:
                store.write_batch(conn, [req(client=f"w{w}", n=random.randint(1, 5))])
        done.append(w)

    seen = []

    def reader():
        cursor = 0
        while True:
            finished = len(done) == 4
            with pool.connection() as conn:
                rows = store.read_events(conn, after=cursor, limit=1000)
            seen.extend(r.id for r in rows)
            if rows:
                cursor = rows[-1].id
            elif finished:
                return
            gevent.sleep(0.001)

    gevent.joinall([gevent.spawn(writer, w) for w in range(4)] + [gevent.spawn(reader)],
                   raise_error=True, timeout=120)
    with pool.connection() as conn:
        everything = [r.id for r in store.read_events(conn, after=0, limit=100000)]
    pool.close()
    assert len(everything) >= 120
    assert seen == everything  # every id, once, in order


def test_pool_never_opens_more_than_its_size(database_url):
    pool = Pool(database_url, 3, timeout_s=30, application_name="bounded-test")
    peak = []

    def use():
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.02)")
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bounded-test'")
            peak.append(cur.fetchone()[0])

    gevent.joinall([gevent.spawn(use) for _ in range(30)], raise_error=True)
    assert max(peak) <= 3 and pool.opened <= 3
    pool.close()


def test_pool_timeout_is_unavailable_with_retry_after(database_url):
    pool = Pool(database_url, 1, timeout_s=0.05)
    with pool.connection():
        with pytest.raises(DatabaseUnavailable) as info:
            with pool.connection():
                pass
    assert info.value.status == 503 and "Retry-After" in info.value.headers
    pool.close()


def test_pool_unreachable_database_is_unavailable():
    pool = Pool("postgresql://postgres@127.0.0.1:1/none", 1, connect_timeout_s=1)
    with pytest.raises(DatabaseUnavailable):
        with pool.connection():
            pass


def test_pool_heals_after_postgres_restart(own_postgres):
    pool = Pool(own_postgres.url, 2, timeout_s=5)
    with pool.connection() as conn:
        EventStore().ping(conn)
    own_postgres.stop()
    with pytest.raises(DatabaseUnavailable):
        with pool.connection() as conn:
            EventStore().ping(conn)
    own_postgres.start()

    def works():
        try:
            with pool.connection() as conn:
                EventStore().ping(conn)
            return True
        except DatabaseUnavailable:
            return False

    wait_until(works, message="the pool to reconnect")
    assert pool.opened <= 2
    pool.close()
