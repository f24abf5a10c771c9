"""The batcher against a real Postgres: group commit, backpressure, isolation, draining."""

import gevent
import pytest

from common.problems import Problem
from ingest.batcher import Backpressure, Batcher
from ingest.pool import DatabaseUnavailable, Pool
from ingest.store import EventStore
from tests.helpers import PositionLock
from tests.helpers import ingest_request as req


@pytest.fixture
def pool(database_url):
    p = Pool(database_url, 2, timeout_s=5)
    yield p
    p.close()


def stored_count(pool):
    with pool.connection() as conn:
        return len(EventStore().read_events(conn, after=0, limit=100000))


def test_concurrent_requests_are_coalesced_into_few_commits(pool):
    batcher = Batcher(EventStore(), pool, max_events=1000, max_wait_ms=20).start()
    flushes = []
    batcher.add_listener(lambda commit: flushes.append(len(commit.requests)))
    requests = [req(client=f"c{i}") for i in range(300)]
    gevent.joinall([gevent.spawn(batcher.commit, r, 10) for r in requests], raise_error=True)
    ids = [r.results[0].id for r in requests]
    assert len(set(ids)) == 300
    assert sum(flushes) == 300 and len(flushes) < 30  # group commit, not one commit per request
    assert batcher.backlog == 0 and stored_count(pool) == 300
    batcher.stop()


def test_max_events_bounds_a_batch_but_never_splits_a_request(pool):
    batcher = Batcher(EventStore(), pool, max_events=10, max_wait_ms=50).start()
    sizes = []
    batcher.add_listener(lambda commit: sizes.append(sum(len(r.events) for r in commit.requests)))
    requests = [req(n=4) for _ in range(10)] + [req(n=25)]
    gevent.joinall([gevent.spawn(batcher.commit, r, 10) for r in requests], raise_error=True)
    assert sorted(sizes)[-1] == 25 and all(s <= 10 for s in sizes if s != 25)
    assert stored_count(pool) == 65
    batcher.stop()


def test_backlog_is_bounded(pool):
    batcher = Batcher(EventStore(), pool, max_events=1000, max_wait_ms=60000, max_backlog=10).start()
    batcher.submit(req(n=6))
    batcher.submit(req(n=4))
    with pytest.raises(Backpressure) as info:
        batcher.submit(req(n=1))
    assert info.value.status == 503 and info.value.headers["Retry-After"]
    assert batcher.stop(timeout=10)  # stopping flushes what was accepted
    assert stored_count(pool) == 10


def test_bad_data_in_one_request_does_not_fail_the_others(pool):
    batcher = Batcher(EventStore(), pool, max_events=1000, max_wait_ms=100).start()
    good = [req(client=f"good{i}", n=3) for i in range(5)]
    bad = req(client="bad\x00client")  # Postgres text cannot hold NUL: the database refuses it
    greenlets = [gevent.spawn(batcher.commit, r, 10) for r in [*good[:2], bad, *good[2:]]]
    gevent.joinall(greenlets)
    errors = [g.exception for g in greenlets]
    assert isinstance(errors[2], Problem) and errors[2].status == 400
    assert [e for i, e in enumerate(errors) if i != 2] == [None] * 5
    assert all(r.results and len(r.results) == 3 for r in good)
    assert stored_count(pool) == 15
    batcher.stop()


def test_pending_lists_accepted_uncommitted_requests(pool):
    batcher = Batcher(EventStore(), pool, max_events=1000, max_wait_ms=60000).start()
    r = req(client="p")
    batcher.submit(r)
    assert list(batcher.pending()) == [r]
    batcher.stop(timeout=10)
    assert list(batcher.pending()) == [] and r.results is not None


def test_stop_flushes_everything_and_refuses_new_work(pool):
    batcher = Batcher(EventStore(), pool, max_events=5, max_wait_ms=60000).start()
    requests = [req(n=2) for _ in range(20)]
    waiting = [gevent.spawn(batcher.commit, r, 30) for r in requests]
    gevent.sleep(0)
    assert batcher.stop(timeout=20)
    gevent.joinall(waiting, raise_error=True)
    assert stored_count(pool) == 40
    with pytest.raises(Problem) as info:
        batcher.submit(req())
    assert info.value.status == 503


def test_database_down_fails_requests_with_503_and_keeps_running():
    dead = Pool("postgresql://postgres@127.0.0.1:1/none", 1, timeout_s=1, connect_timeout_s=1)
    batcher = Batcher(EventStore(), dead, max_events=100, max_wait_ms=1).start()
    with pytest.raises(DatabaseUnavailable):
        batcher.commit(req(), timeout=10)
    with pytest.raises(DatabaseUnavailable):  # the batcher greenlet is still alive
        batcher.commit(req(), timeout=10)
    assert batcher.backlog == 0
    batcher.stop()


def test_a_lone_request_is_written_at_once_when_nothing_is_in_flight(pool):
    batcher = Batcher(EventStore(), pool, max_events=1000, max_wait_ms=60000).start()
    r = req()
    batcher.commit(r, timeout=10)  # not 60 s: an idle batcher does not wait for company
    assert r.results and stored_count(pool) == 1
    batcher.stop(timeout=10)


def test_commit_timeout_takes_a_queued_request_back(pool, database_url):
    batcher = Batcher(EventStore(), pool, max_events=1000, max_wait_ms=60000).start()
    lock = PositionLock(database_url)  # the first write waits for it
    first = gevent.spawn(batcher.commit, req(client="first"), 30)
    gevent.sleep(0.1)  # the first batch is in flight (it cannot finish), so the next gathers
    r = req()
    with pytest.raises(Problem) as info:
        batcher.commit(r, timeout=0.05)
    assert info.value.status == 503 and r.cancelled and batcher.backlog == 1
    lock.release()
    first.get(timeout=10)
    batcher.stop(timeout=10)
    assert stored_count(pool) == 1  # the first; the one taken back never was written


def test_commit_ranges_are_contiguous_and_cover_every_id(pool):
    batcher = Batcher(EventStore(), pool, max_events=50, max_wait_ms=5).start()
    commits = []
    batcher.add_listener(commits.append)
    requests = [req(n=1 + i % 7, key=None) for i in range(60)] + [req(key="dup"), req(key="dup")]
    gevent.joinall([gevent.spawn(batcher.commit, r, 10) for r in requests], raise_error=True)
    assert commits[0].after == 0
    for prev, nxt in zip(commits, commits[1:], strict=False):
        assert nxt.after == prev.upto
    for commit in commits:
        ids = [w.id for r in commit.requests for w in r.results if not w.duplicate]
        assert all(commit.after < i <= commit.upto for i in ids)
    batcher.stop()


def test_two_batches_in_flight_commit_and_notify_in_order(pool):
    """While one batch is written the next is prepared (its keys claimed, its transaction held
    open): commits, wake-ups and listeners stay in batch order, ranges contiguous, every key
    stored once, the pending list complete."""

    class CountingStore(EventStore):
        early = 0

        def write_batch(self, conn, requests, known=None, prepared=None, **hooks):
            if prepared is not None:
                CountingStore.early += 1
            return super().write_batch(conn, requests, known, prepared, **hooks)

        def prepare(self, conn, requests, known=None):
            gevent.sleep(0.002)  # a slower batch: the one behind it surely comes meanwhile
            return super().prepare(conn, requests, known)

    batcher = Batcher(CountingStore(), pool, max_events=40, max_wait_ms=1).start()
    commits = []
    batcher.add_listener(commits.append)
    requests = [req(n=5, key=None) for _ in range(40)]
    requests += [req(key=f"k{i % 30}") for i in range(120)]  # each key four times
    gevent.joinall([gevent.spawn(batcher.commit, r, 20) for r in requests], raise_error=True)
    assert len(commits) > 2 and CountingStore.early > 0  # batches were in flight together
    for prev, nxt in zip(commits, commits[1:], strict=False):
        assert nxt.after == prev.upto  # in order: each commit starts where the last ended
    keyed = [r for r in requests if r.events[0].key is not None]
    first_ids = {}
    for r in keyed:
        first_ids.setdefault(r.events[0].key, set()).add(r.results[0].id)
    assert all(len(ids) == 1 for ids in first_ids.values())  # one event per key
    assert sum(not r.results[0].duplicate for r in keyed) == 30
    assert stored_count(pool) == 40 * 5 + 30
    assert batcher.backlog == 0 and list(batcher.pending()) == []
    batcher.stop()


def test_keys_are_not_looked_up_until_a_batch_meets_a_stored_one(pool, monkeypatch):
    """Most keys are new: a batch is written as if none were stored. A stored one fails the key
    table's primary key and the batch is planned again with its keys looked up (a duplicate
    with the original id, or 422); from then on keys are looked up for LOOKUP_AFTER_REPEAT_S."""

    class RecordingStore(EventStore):
        def __init__(self):
            super().__init__()
            self.known_given: list[object] = []

        def write_batch(self, conn, requests, known=None, prepared=None, **hooks):
            self.known_given.append(None if known is None else dict(known))
            return super().write_batch(conn, requests, known, prepared, **hooks)

    store = RecordingStore()
    batcher = Batcher(store, pool, max_events=100, max_wait_ms=1).start()

    def written(r):
        batcher.commit(r, 10)
        return r.results[0]

    first = written(req(key="a"))
    again = written(req(key="a"))  # written blind: the primary key catches it
    assert store.known_given == [{}, {}]
    assert again.duplicate and again.id == first.id and stored_count(pool) == 1
    fresh = written(req(key="b"))  # a repeat was just met: look keys up
    assert store.known_given[-1] is None and not fresh.duplicate
    with pytest.raises(Problem) as info:
        reused = req(key="a")
        reused.events[0].data = '"another event"'
        batcher.commit(reused, 10)
    assert info.value.status == 422
    monkeypatch.setattr("ingest.batcher.LOOKUP_AFTER_REPEAT_S", 0.0)  # the quiet time is over
    with pytest.raises(Problem) as info:  # written blind again, and still refused
        batcher.commit(reused.__class__(reused.client_id, reused.events), 10)
    assert info.value.status == 422 and store.known_given[-1] == {}
    assert stored_count(pool) == 2
    batcher.stop()


def test_a_request_that_cannot_be_encoded_fails_alone_and_the_batcher_carries_on(pool, database_url):
    """A lone surrogate (which no encoder takes) in one request of a group commit: that request
    gets a 400, the other five commit, and the batcher keeps writing."""
    batcher = Batcher(EventStore(), pool, max_events=1000, max_wait_ms=50).start()
    lock = PositionLock(database_url)  # holds the first batch: the six gather into the next
    first = gevent.spawn(batcher.commit, req(client="warm-up"), 10)
    gevent.sleep(0.2)
    good = [req(client=f"good-{i}", n=200) for i in range(5)]
    bad = req(client="user-\ud800")
    waits = [gevent.spawn(batcher.commit, r, 10) for r in [*good[:2], bad, *good[2:]]]
    gevent.sleep(0.2)
    lock.release()
    first.get()
    gevent.joinall(waits)
    assert [w.successful() for w in waits] == [True, True, False, True, True, True]
    assert isinstance(waits[2].exception, Problem) and waits[2].exception.status == 400
    assert stored_count(pool) == 1 + 5 * 200
    batcher.commit(req(client="after"), 10)  # still writing
    assert stored_count(pool) == 1 + 5 * 200 + 1
    batcher.stop()
