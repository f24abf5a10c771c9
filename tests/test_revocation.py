"""Be paranoid about tokens: a live subscription ends when the token that admitted it expires,
and `POST /api/v1/revocations` (by jti or by subject) ends every connection it admitted in every
process and refuses the token afterwards, while tokens of that subject issued later work."""

from __future__ import annotations

import time

import gevent
import pytest

from tests.helpers import POLL, auth, open_sse, token, wait_until

pytestmark = pytest.mark.slow
REVOKER = {"Authorization": f"Bearer {token('origin', revoke=True)}"}


def ends_with_retry(stream, timeout=15):
    """The stream's last items before it closes: a `retry:` and then the end."""
    items = []
    with gevent.Timeout(timeout):
        while True:
            item = stream.next(("event", "retry"), timeout=timeout)
            if item == ("end",):
                return items
            items.append(item)


@pytest.fixture
def pair(make_server, database_url):
    a = make_server(database_url, LONGPOLL_MAX_S="20")
    b = make_server(database_url, LONGPOLL_MAX_S="20")
    a.put("/api/v1/streams/rv/1", headers=auth())
    return a, b


def test_an_expiring_token_ends_its_stream_and_its_held_poll(pair):
    a, _ = pair
    short = token("brief", ttl_s=2)
    s = open_sse(a, "rv/1", short)
    assert s.response.status_code == 200
    s.next(("retry",))  # the preamble
    poll = gevent.spawn(
        a.get,
        POLL,
        params={"stream": "rv/1", "timeout": "20"},
        headers={"Authorization": f"Bearer {short}"},
        timeout=30,
    )
    items = ends_with_retry(s, timeout=20)  # exp + TOKEN_LEEWAY_S (5 s), then the ticker
    assert items and items[-1][0] == "retry"
    # The held poll (20 s) ends with the token too: the same second, not at its hold's end.
    wait_until(poll.ready, timeout=8, message="the held poll to end with its token")
    answer = poll.get()
    assert answer.status_code == 200 and answer.json()["events"] == []
    s.close()
    again = open_sse(a, "rv/1", short)
    assert again.response.status_code == 401  # and the reconnect must bring a new token
    again.close()


def test_revoking_a_jti_ends_its_connections_in_every_process(pair):
    a, b = pair
    victim = token("user-7", jti="tok-1")
    bystander = token("user-7", jti="tok-2")
    on_a, on_b = open_sse(a, "rv/1", victim), open_sse(b, "rv/1", victim)
    other = open_sse(b, "rv/1", bystander)
    for s in (on_a, on_b, other):
        s.next(("retry",))
    r = a.post("/api/v1/revocations", json={"jti": "tok-1"}, headers=REVOKER)
    assert r.status_code == 202 and r.json()["revoked"] == {"jti": "tok-1"}
    for s in (on_a, on_b):
        assert ends_with_retry(s)[-1][0] == "retry"
    for server in (a, b):
        wait_until(
            lambda server=server: open_sse(server, "rv/1", victim).response.status_code == 401,
            timeout=10,
            message="the revoked token refused",
        )
    r = a.get(POLL, params={"stream": "rv/1", "timeout": "0"}, headers={"Authorization": f"Bearer {victim}"})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert other.queue.empty()  # another token of the same user is untouched
    assert open_sse(b, "rv/1", bystander).response.status_code == 200
    for s in (on_a, on_b, other):
        s.close()


def test_revoking_a_subject_ends_its_tokens_but_later_ones_work(pair):
    a, b = pair
    old = token("user-9", iat=int(time.time()) - 10)
    s = open_sse(b, "rv/1", old)
    s.next(("retry",))
    r = a.post("/api/v1/revocations", json={"sub": "user-9"}, headers=REVOKER)
    assert r.status_code == 202 and r.json()["revoked"]["sub"] == "user-9"
    assert ends_with_retry(s)[-1][0] == "retry"
    wait_until(
        lambda: open_sse(b, "rv/1", old).response.status_code == 401,
        timeout=10,
        message="the subject's old token refused",
    )
    later = token("user-9", iat=int(time.time()) + 2)  # issued after the revocation
    fresh = open_sse(a, "rv/1", later)
    assert fresh.response.status_code == 200
    fresh.close()
    s.close()


@pytest.mark.parametrize(
    "body", [{}, {"jti": ""}, {"jti": 5}, {"jti": "a", "sub": "b"}, {"user": "x"}, [1], "jti"]
)
def test_bad_revocation_bodies_are_400(module_server, body):
    r = module_server.post("/api/v1/revocations", json=body, headers=REVOKER)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"] == "application/problem+json"


def test_revoking_needs_the_revoke_claim(module_server):
    r = module_server.post("/api/v1/revocations", json={"sub": "anyone"}, headers=auth())
    assert r.status_code == 403
    assert module_server.post("/api/v1/revocations", json={"sub": "anyone"}).status_code == 401
