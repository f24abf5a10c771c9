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
def test_a_key_repeated_later_in_the_same_batch_names_the_event_written_now(pool, looked_up_first):
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
    assert [(r.id, r.key) for r in rows] == [(after + 1, None), (after + 2, None), (after + 3, "twice")]


def test_keys_looked_up_before_the_lock_are_checked_again_when_one_raced_in(pool):
    """Keys looked up earlier, then claimed. A key that another batch stored in between fails
    the claim, and the batch is planned again from a fresh lookup: a duplicate of the event
    that won, nothing written twice, nothing lost."""
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
            cur.execute("INSERT INTO event_keys (client_id, key, id, stream) VALUES ('c', 'k', 999, 's')")


def test_a_batch_claims_its_keys_without_the_position_lock(pool, database_url):
    """The serial section holds the position counter's row lock from the reservation to the
    COMMIT, so a batch's keys are claimed before it: with the lock held elsewhere, `prepare`
    finishes (its key rows are in its open transaction, naming its ticket and place, not yet a
    position), the write waits, and once the lock is free the key names the event's position."""
    store = EventStore()
    holder = psycopg2.connect(database_url)
    holder.autocommit = True
    held = holder.cursor()
    held.execute("BEGIN; SELECT last FROM sluice_position FOR UPDATE")
    r = req(key="early", n=1)
    with pool.connection() as conn:
        prepared = gevent.with_timeout(10, store.prepare, conn, [r], {})
        with conn.cursor() as cur:  # inside the batch's transaction
            cur.execute("SELECT ticket IS NOT NULL, place, id FROM event_keys WHERE key = 'early'")
            assert cur.fetchall() == [(True, 1, None)]
        writer = gevent.spawn(store.write_batch, conn, [r], {}, prepared)
        gevent.sleep(0.3)
        assert not writer.ready()  # the serial statement waits for the lock
        held.execute("COMMIT")
        after, upto = writer.get(timeout=10)
    holder.close()
    assert (upto - after, r.results[0].id) == (1, after + 1)
    with pool.connection() as conn:
        assert store.key_position(conn, "c", "early") == after + 1
    (again,) = write(pool, req(key="early"))
    assert again.results[0].duplicate and again.results[0].id == after + 1


@pytest.mark.parametrize("first_commits", [True, False])
def test_a_key_claimed_by_a_batch_in_flight_waits_for_it(pool, first_commits):
    """Two batches with the same key: the second's claim waits for the first's transaction.
    If the first commits, the second is planned again and answered as its duplicate; if the
    first rolls back, the second's event is the new one. One event either way."""
    store = EventStore()
    first, second = req(key="shared"), req(key="shared")
    with pool.connection() as a, pool.connection() as b:
        prepared = store.prepare(a, [first], {})
        other = gevent.spawn(store.write_batch, b, [second], {})
        gevent.sleep(0.3)
        assert not other.ready()  # waiting in Postgres for the first batch's key
        if first_commits:
            store.write_batch(a, [first], {}, prepared)
        else:
            with a.cursor() as cur:
                cur.execute("ROLLBACK")
        other.get(timeout=10)
    if first_commits:
        assert second.results[0].duplicate and second.results[0].id == first.results[0].id
    else:
        assert not second.results[0].duplicate
    with pool.connection() as conn:
        rows = store.read_events(conn, after=0, limit=10)
        assert [r.id for r in rows] == [second.results[0].id]
        assert store.key_position(conn, "c", "shared") == second.results[0].id


def test_concurrent_batches_with_overlapping_keys_store_each_key_once(database_url):
    """Writers claim overlapping keys in random orders (claims are made in key order, so they
    never deadlock; a key that raced in sends the batch back to a fresh lookup): every batch
    commits, each key names one event, and every repeat is answered with that event's id."""
    pool = Pool(database_url, 6, timeout_s=30)
    store = EventStore()
    keys = [f"k{i}" for i in range(40)]
    results: list = []

    def writer():
        for _ in range(15):
            batch = [req(key=k) for k in random.sample(keys, 12)]
            with pool.connection() as conn:
                store.write_batch(conn, batch, {})
            results.extend((r.events[0].key, r.results[0].id) for r in batch)

    gevent.joinall([gevent.spawn(writer) for _ in range(5)], raise_error=True, timeout=120)
    ids: dict[str, set[int]] = {}
    for key, i in results:
        ids.setdefault(key, set()).add(i)
    assert len(results) == 5 * 15 * 12 and all(len(v) == 1 for v in ids.values())
    with pool.connection() as conn:
        rows = store.read_events(conn, after=0, limit=1000)
        assert sorted(r.key for r in rows) == sorted(ids)  # one event per key used
        assert all(store.key_position(conn, "c", k) == next(iter(v)) for k, v in ids.items())
    pool.close()


def test_a_batch_raced_on_each_of_its_keys_in_turn_is_still_written(pool):
    """Every plan of one batch loses a race on another of its keys (another batch claims it
    before this one's claim and commits while the claim waits): more races than the fixed
    bound of plans, yet each one stores a key that the next plan finds, so the batch commits
    and each of its keys names the event the other batch wrote."""
    from ingest.store import KEY_RACE_ATTEMPTS

    store = EventStore()
    keys = [f"r{i}" for i in range(KEY_RACE_ATTEMPTS + 3)]
    batch = [req(key=k) for k in keys]
    raced: list[int] = []
    with pool.connection() as conn, pool.connection() as other:
        store.write_batch(conn, [req()])  # the first slice exists before any race
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]

        def blocked() -> bool:  # this batch's claim waits for the other batch's uncommitted key
            with pool.connection() as probe, probe.cursor() as cur:
                cur.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
                return cur.fetchone()[0] == "Lock"

        def race() -> None:  # before each plan: another batch claims the next key, uncommitted
            if len(raced) == len(keys) - 1:
                return  # the last plan goes through unraced
            theirs = [req(key=keys[len(raced)])]
            prepared = store.prepare(other, theirs, {})
            raced.append(1)

            def commit_once_waited_on() -> None:
                wait_until(blocked, timeout=10)
                store.finish(other, theirs, prepared)
                raced[-1] = theirs[0].results[0].id

            gevent.spawn(commit_once_waited_on)

        after, upto = store.write_batch(conn, batch, None, before_prepare=race)
    assert len(raced) == len(keys) - 1 > KEY_RACE_ATTEMPTS
    results = [r.results[0] for r in batch]
    assert [w.id for w in results[:-1]] == raced and all(w.duplicate for w in results[:-1])
    mine = results[-1]
    assert not mine.duplicate and max(raced) <= after < mine.id <= upto
    with pool.connection() as conn:
        assert [store.key_position(conn, "c", k) for k in keys] == raced + [mine.id]
        assert [r.key for r in store.read_events(conn, after=after, limit=10)] == [keys[-1]]


def test_a_rekey_moves_the_key_and_a_move_raced_in_is_planned_again(pool):
    """Mercure's ids (`rekey`): a different event under a used key becomes a new event and the
    key moves to it; the same event again is a duplicate of the newest. If another batch moves
    the key between the lookup and the move, the move finds it changed and the batch is
    planned again from a fresh lookup."""
    store = EventStore()

    def rekeyed(data):
        r = req(key="m")
        r.events[0].data = data
        r.rekey = True
        return r

    (a,) = write(pool, rekeyed('"a"'))
    (b,) = write(pool, rekeyed('"b"'))
    assert not b.results[0].duplicate and b.results[0].id > a.results[0].id
    (b_again,) = write(pool, rekeyed('"b"'))
    assert b_again.results[0].duplicate and b_again.results[0].id == b.results[0].id

    class RacedStore(EventStore):
        raced = False

        def _existing_keys(self, cur, requests, trip=None):
            seen = super()._existing_keys(cur, requests, trip)
            if not RacedStore.raced:  # another batch moves the key right after this lookup
                RacedStore.raced = True
                write(pool, rekeyed('"c"'))
            return seen

    d = rekeyed('"d"')
    with pool.connection() as conn:
        RacedStore().write_batch(conn, [d])
    assert RacedStore.raced and not d.results[0].duplicate
    with pool.connection() as conn:
        assert store.key_position(conn, "c", "m") == d.results[0].id
        datas = [r.data for r in store.read_events(conn, after=0, limit=10)]
    assert datas == ['"a"', '"b"', '"c"', '"d"']


def test_commit_order_equals_id_order_under_concurrent_writers(database_url):
    """A reader tailing with `after=<last id seen>` must receive every event exactly once.

    Writers hold their transactions open for a random moment between taking ids and committing
    (a sleep inside the batch statement, after the counter's UPDATE); with ids from a plain
    sequence, a later id could commit first and the tail would skip the earlier one for good.
    """

    class SlowStore(EventStore):
        def _write_sql(self, *, keyed):
            return (
                super()
                ._write_sql(keyed=keyed)
                .replace("SELECT set_config(", f"SELECT pg_sleep({random.uniform(0, 0.01):.4f}), set_config(")
            )

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

    gevent.joinall(
        [gevent.spawn(writer, w) for w in range(4)] + [gevent.spawn(reader)], raise_error=True, timeout=120
    )
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
