"""Long-poll pacing (auth/backoff.py) against a real Redis: counted in the process up to half
the budget, then in Redis for the whole fleet, seeded with the process's count."""

from __future__ import annotations

import itertools

import redis

from auth.backoff import Backoff

_keys = itertools.count()


def test_one_process_counts_exactly_without_redis_until_half_the_budget(redis_url):
    r = redis.Redis.from_url(redis_url)
    key = f"bk-{next(_keys)}"
    b = Backoff(r)
    answers = [b.poll(key, max_rate=1) for _ in range(14)]  # budget: 10 per 10 s
    assert [wait for wait, _ in answers[:10]] == [0] * 10
    assert all(wait > 0 for wait, _ in answers[10:])  # the 11th and later: slow down
    assert r.get(f"sluice:poll:{key}") is not None  # counted in Redis once past half


def test_polls_spread_over_processes_add_up_in_redis(redis_url):
    r = redis.Redis.from_url(redis_url)
    key = f"bk-{next(_keys)}"
    a, b = Backoff(r), Backoff(r)  # two processes' counters, one Redis
    waits = []
    for _ in range(7):
        waits.append(a.poll(key, max_rate=1)[0])
        waits.append(b.poll(key, max_rate=1)[0])
    assert waits[:10] == [0] * 10  # each process is within half its budget
    assert any(w > 0 for w in waits[10:])  # together past the budget: paced
    assert int(r.get(f"sluice:poll:{key}")) >= 12
