"""The hub against real Postgres and Redis: global order, holes filled, Redis down, overflow."""

import random
import uuid

import gevent
import orjson
import pytest
import redis

from ingest.batcher import Batcher
from ingest.pool import Pool
from ingest.store import EventStore
from streaming import hub as hub_module
from streaming.hub import FANOUT_SLICE, Hub, breathe
from tests.helpers import ingest_request as req
from tests.helpers import wait_until


@pytest.fixture
def channel():
    return f"test:{uuid.uuid4().hex}"


@pytest.fixture
def rconn(redis_url):
    return redis.Redis.from_url(redis_url)


class Process:
    """What one server process has: a pool, a batcher and a hub, wired as the app wires them."""

    def __init__(self, database_url, redis_client, channel, late_publish=False, **hub_kw):
        self.pool = Pool(database_url, 3, timeout_s=10)
        self.batcher = Batcher(EventStore(), self.pool, max_events=50, max_wait_ms=2).start()
        self.hub = Hub(
            EventStore(),
            self.pool,
            redis_client,
            channel=channel,
            gap_wait_s=0.1,
            poll_s=0.1,
            redis_retry_s=0.1,
            **hub_kw,
        ).start()
        if late_publish:  # publish each batch a random moment late, as a busy process might
            self.batcher.add_listener(
                lambda c: gevent.spawn_later(random.uniform(0, 0.03), self.hub.on_commit, c)
            )
        else:
            self.batcher.add_listener(self.hub.on_commit)

    def publish(self, stream, n=1):
        r = req(stream=stream, n=n)
        self.batcher.commit(r, 10)
        return [w.id for w in r.results]

    def close(self):
        self.batcher.stop()
        self.hub.stop()
        self.pool.close()


def drain(sub, count, timeout=10):
    """The next `count` events from a subscription's queue of deliveries."""
    got = []
    with gevent.Timeout(timeout):
        while len(got) < count:
            got.extend(sub.queue.get())
    return got


def test_live_events_reach_only_their_streams_subscribers_in_order(database_url, rconn, channel):
    p = Process(database_url, rconn, channel)
    sub_a, start = p.hub.subscribe(["a"], maxsize=100)
    sub_b, _ = p.hub.subscribe(["b"], maxsize=100)
    ids = {"a": [], "b": []}
    for i in range(10):
        stream = "a" if i % 2 == 0 else "b"
        ids[stream] += p.publish(stream, n=2)
    got = drain(sub_a, 10)
    assert [(e.stream, e.position) for e in got] == [("a", i) for i in ids["a"]]
    assert got[0].body.startswith(b"event: message\ndata: ")
    assert [e.position for e in drain(sub_b, 10)] == ids["b"]
    assert sub_a.queue.qsize() == 0 and sub_b.queue.qsize() == 0
    assert p.hub.position >= max(ids["a"] + ids["b"]) > start
    p.close()


def test_two_processes_with_late_publishers_deliver_in_global_order(database_url, rconn, channel):
    one = Process(database_url, rconn, channel, late_publish=True)
    two = Process(database_url, rconn, channel, late_publish=True)
    sub, _ = one.hub.subscribe(["s"], maxsize=10000)
    jobs = [
        gevent.spawn(lambda p=p: [p.publish("s", n=random.randint(1, 3)) for _ in range(40)])
        for p in (one, two, one, two)
    ]
    gevent.joinall(jobs, raise_error=True)
    everything = []
    for batch in (j.value for j in jobs):
        for ids in batch:
            everything += ids
    got = drain(sub, len(everything))
    assert [e.position for e in got] == sorted(everything)  # every event once, in id order
    assert sub.queue.qsize() == 0
    one.close()
    two.close()


def test_a_lost_message_is_filled_from_postgres(database_url, rconn, channel):
    p = Process(database_url, rconn, channel)
    sub, _ = p.hub.subscribe(["s"], maxsize=1000)
    # Commits whose notifications never reach Redis (as if lost), then one that does.
    silent = Batcher(EventStore(), p.pool, max_events=50, max_wait_ms=1).start()
    lost = []
    for _ in range(5):
        r = req(stream="s", n=3)
        silent.commit(r, 10)
        lost += [w.id for w in r.results]
    later = p.publish("s", n=2)
    got = drain(sub, len(lost) + 2)
    assert [e.position for e in got] == lost + later
    silent.stop()
    p.close()


def test_own_commits_reach_the_hub_at_once_and_their_echo_is_dropped(database_url, rconn, channel):
    p = Process(database_url, rconn, channel)
    wait_until(lambda: p.hub.redis_up, message="the hub to subscribe")
    sub, _ = p.hub.subscribe(["s"], maxsize=100)
    received, ended = [], []
    deliver = p.hub.relay.receive
    p.hub.relay.receive = lambda a, u, e: (received.append((a, u)), deliver(a, u, e))
    p.hub.relay.end = ended.append
    wire = rconn.pubsub()
    wire.subscribe(channel)
    wire.get_message(timeout=2)  # the subscribe confirmation
    ids = p.publish("s", n=2)
    wait_until(lambda: received, message="the commit to reach the hub")
    message = wire.get_message(timeout=5)
    assert message["data"].startswith(b'{"p":"' + p.hub.relay.origin.encode() + b'",')
    # Redis sends a subscription's messages in order: once a later one is in, the echo was too.
    rconn.publish(channel, orjson.dumps({"end": "marker"}))
    wait_until(lambda: ended == ["marker"], message="the marker to arrive")
    assert received == [(ids[0] - 1, ids[-1])]  # once: the echo was not delivered again
    # Its own commits need no echo at all: published where this process does not listen.
    p.hub.relay.channel = channel + ":elsewhere"
    more = p.publish("s", n=2)
    p.hub.relay.channel = channel
    assert [e.position for e in drain(sub, 4)] == ids + more
    # A message without an origin (a process of the previous release) is delivered as before.
    old = [[more[-1] + 1, "s", "message", '"old"']]
    rconn.publish(channel, orjson.dumps({"a": more[-1], "u": more[-1] + 1, "e": old}))
    assert [e.position for e in drain(sub, 1)] == [more[-1] + 1]
    wire.close()
    p.close()


def test_without_redis_delivery_continues_locally_and_by_polling(database_url, channel):
    dead = redis.Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    p = Process(database_url, dead, channel)
    assert not p.hub.redis_up
    sub, _ = p.hub.subscribe(["s"], maxsize=1000)
    local = p.publish("s", n=2)
    other = Batcher(EventStore(), p.pool, max_events=50, max_wait_ms=1).start()  # "another process"
    r = req(stream="s", n=2)
    other.commit(r, 10)
    got = drain(sub, 4)
    assert [e.position for e in got] == local + [w.id for w in r.results]
    other.stop()
    p.close()


def test_a_full_queue_cuts_only_that_subscriber(database_url, rconn, channel):
    p = Process(database_url, rconn, channel)
    slow, _ = p.hub.subscribe(["s"], maxsize=3)
    fast, _ = p.hub.subscribe(["s"], maxsize=100)
    ids = []
    for _ in range(10):  # ten commits: ten deliveries, more than the slow queue holds
        ids += p.publish("s")
    assert [e.position for e in drain(fast, 10)] == ids
    wait_until(lambda: slow.overflowed, message="the slow subscriber to overflow")
    assert slow.closed and p.hub.overflows == 1
    assert p.hub.subscriber_count("s") == 1
    assert [e.position for e in drain(slow, 3)] == ids[:3]  # what it got is in order, no gap
    p.close()


def test_subscribe_position_is_the_catch_up_seam(database_url, rconn, channel):
    p = Process(database_url, rconn, channel)
    before = p.publish("s", n=3)
    wait_until(lambda: p.hub.position >= before[-1], message="the hub to catch up")
    sub, seam = p.hub.subscribe(["s"], maxsize=100)
    after = p.publish("s", n=3)
    with p.pool.connection() as conn:
        history = [e.id for e in EventStore().read_events(conn, after=0, upto=seam, limit=100)]
    live = [e.position for e in drain(sub, 3)]
    assert history + live == before + after  # catch-up to the seam, then live: no gap, no dup
    p.close()


class Recorder:
    """A sink, as a parked idle connection offers one: records each delivery it is handed."""

    def __init__(self, order, on_first=None):
        self.order = order  # shared by all: who was handed a delivery, in turn
        self.calls = []
        self.on_first = on_first

    def __call__(self, lives):
        self.calls.append([e.position for e in lives])
        self.order.append(self)
        if self.on_first is not None:
            on_first, self.on_first = self.on_first, None
            on_first()

    def write(self, data):
        pass


def sinks(hub, n, order, on_first=None):
    out = []
    for i in range(n):
        sub, _ = hub.subscribe(["s"], maxsize=10)
        sub.sink = Recorder(order, on_first if i == 0 else None)
        out.append(sub.sink)
    return out


def test_a_large_fan_out_lets_the_event_loop_run_between_slices(database_url, rconn, channel):
    p = Process(database_url, rconn, channel)
    n = 3 * FANOUT_SLICE
    order = []
    sinks(p.hub, n, order)
    seen = []  # how many subscribers had the event each time another greenlet got to run

    def watch():
        while len(order) < n:
            seen.append(len(order))
            breathe()

    watcher = gevent.spawn(watch)
    try:
        p.publish("s")
        watcher.join(timeout=10)
        assert len(order) == n
        assert any(0 < k < n for k in seen)  # it ran in the middle of the fan-out
    finally:
        watcher.kill()
        p.close()


def test_commits_that_arrive_during_a_pass_go_out_together_in_the_next(database_url, rconn, channel):
    p = Process(database_url, rconn, channel)

    def two_more():  # as the Redis listener hands on commits while the pass yields
        at = p.hub.position
        p.hub._receive(at, at + 1, [[at + 1, "s", "message", "{}"]])
        p.hub._receive(at + 1, at + 2, [[at + 2, "s", "message", "{}"]])

    order = []
    handed = sinks(p.hub, 2 * FANOUT_SLICE, order, on_first=lambda: gevent.spawn(two_more))
    [first] = p.publish("s")
    wait_until(lambda: len(order) == 4 * FANOUT_SLICE, message="both passes")
    assert handed[-1].calls == [[first], [first + 1, first + 2]]  # one write for the two
    assert all(s.calls == handed[-1].calls for s in handed)
    p.close()


def test_a_full_outbox_makes_the_commit_receiver_wait(database_url, rconn, channel, monkeypatch):
    monkeypatch.setattr(hub_module, "OUTBOX_EVENTS", 3)
    p = Process(database_url, rconn, channel)
    waiting = []  # the outbox's size each time the receiver got its call back

    def five_more():
        for _ in range(5):
            at = p.hub.position
            p.hub._receive(at, at + 1, [[at + 1, "s", "message", "{}"]])
            waiting.append(p.hub._outbox_events)

    order = []
    handed = sinks(p.hub, 2 * FANOUT_SLICE, order, on_first=lambda: gevent.spawn(five_more))
    [first] = p.publish("s")
    wait_until(lambda: len(waiting) == 5 and not p.hub._outbox_events, message="five more")
    assert max(waiting) <= 3  # it waited for the deliverer instead of queueing a fourth
    wait_until(lambda: sum(map(len, handed[-1].calls)) == 6, message="all six delivered")
    assert [pos for call in handed[-1].calls for pos in call] == list(range(first, first + 6))
    p.close()
