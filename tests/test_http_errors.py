"""Bad input and bad tokens get a clear 4xx problem and store nothing.

These tests share one server: each asserts that it left nothing behind.
"""

import time

import jwt
import pytest

from tests.helpers import SECRET, auth


@pytest.fixture
def server(module_server):
    return module_server


EVENTS = "/api/v1/events"
PROBLEM = "application/problem+json"


def assert_nothing_stored(server, sub="client-1"):
    r = server.get(EVENTS, params={"clientId": sub}, headers=auth("auditor"))
    assert r.status_code == 200 and r.json()["events"] == []


def assert_problem(r, status, **fields):
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    for k, v in fields.items():
        assert body.get(k) == v, (k, body)
    return body


@pytest.mark.parametrize(
    "body, field, index",
    [
        ([{"stream": "ok", "data": 1}, {"stream": "bad name!", "data": 2}], "stream", 1),
        ([{"stream": "ok", "data": 1}, {"stream": "/leading-slash", "data": 2}], "stream", 1),
        ([{"stream": "ok", "data": 1}, {"data": 2}], "stream", 1),
        ([{"stream": "ok", "data": 1}, {"stream": "ok"}], "data", 1),
        ([{"stream": "ok", "type": "has space", "data": 1}], "type", 0),
        ([{"stream": "ok", "type": "x" * 65, "data": 1}], "type", 0),
        ([{"stream": "ok", "data": 1, "key": ""}], "key", 0),
        ([{"stream": "ok", "data": 1, "extra": True}], "extra", 0),
        ([{"stream": "s" * 201, "data": 1}], "stream", 0),
        # Python's `$` matches before a final newline: names must be matched whole.
        ([{"stream": "ok", "data": 1}, {"stream": "ok\n", "data": 2}], "stream", 1),
        ([{"stream": "ok", "type": "message\n", "data": 1}], "type", 0),
    ],
)
def test_invalid_event_names_index_and_field(server, body, field, index):
    r = server.post(EVENTS, json=body, headers=auth())
    assert_problem(r, 400, field=field, index=index)
    assert_nothing_stored(server)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"42", b"[]", b"[1, 2]", b'"text"'])
def test_invalid_json_bodies(server, raw):
    r = server.post(EVENTS, data=raw, headers={**auth(), "Content-Type": "application/json"})
    assert_problem(r, 400)
    assert_nothing_stored(server)


def test_invalid_ndjson_line_names_it(server):
    body = b'{"stream":"a","data":1}\n{oops\n'
    r = server.post(EVENTS, data=body, headers={**auth(), "Content-Type": "application/x-ndjson"})
    assert_problem(r, 400, index=1)
    assert_nothing_stored(server)


def test_oversized_body_is_413(server):
    big = b'{"stream":"a","data":"' + b"x" * (1024 * 1024) + b'"}'
    r = server.post(EVENTS, data=big, headers={**auth(), "Content-Type": "application/json"})
    assert_problem(r, 413)
    assert_nothing_stored(server)


def test_oversized_chunked_body_is_413(server):
    def chunks():
        yield b'{"stream":"a","data":"'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    r = server.post(EVENTS, data=chunks(), headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 413
    assert_nothing_stored(server)


def test_too_many_events_is_413(server):
    r = server.post(EVENTS, json=[{"stream": "a", "data": i} for i in range(1001)], headers=auth())
    assert_problem(r, 413, limit=1000)
    assert_nothing_stored(server)


def test_data_too_large_is_413(server):
    r = server.post(EVENTS, json={"stream": "a", "data": "x" * 70000}, headers=auth())
    assert_problem(r, 413, field="data")
    assert_nothing_stored(server)


def test_wrong_content_type_is_415(server):
    r = server.post(EVENTS, data="stream=a", headers={**auth(), "Content-Type": "text/plain"})
    assert_problem(r, 415)
    assert_nothing_stored(server)


def test_idempotency_header_with_batch_is_400(server):
    r = server.post(EVENTS, json=[{"stream": "a", "data": 1}], headers={**auth(), "Idempotency-Key": "k"})
    assert_problem(r, 400)
    assert_nothing_stored(server)


def _tok(claims, key=SECRET, alg="HS256", headers=None):
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def _claims(**over):
    now = int(time.time())
    return {"sub": "client-1", "exp": now + 600, "publish": ["**"], "subscribe": ["**"], **over}


@pytest.mark.parametrize(
    "bearer",
    [
        None,
        "not-a-jwt",
        _tok(_claims(), key="another-secret-entirely-0123456789abcdef"),
        _tok(_claims(exp=int(time.time()) - 120)),
        _tok(_claims(nbf=int(time.time()) + 600)),
        _tok({k: v for k, v in _claims().items() if k != "sub"}),
        _tok({k: v for k, v in _claims().items() if k != "exp"}),
        _tok(_claims(publish="**")),
        _tok(_claims(publish=["a\n"])),  # a pattern is matched whole, like a stream name
        _tok(_claims(), headers={"kid": "unknown"}),
        jwt.encode(_claims(), None, algorithm="none"),
        jwt.encode(_claims(), SECRET + SECRET, algorithm="HS512"),
    ],
)
def test_bad_tokens_are_401_and_store_nothing(server, bearer):
    headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
    r = server.post(EVENTS, json={"stream": "a", "data": 1}, headers=headers)
    assert_problem(r, 401)
    assert "WWW-Authenticate" in r.headers
    assert_nothing_stored(server)


def test_basic_auth_scheme_is_401(server):
    r = server.post(EVENTS, json={"stream": "a", "data": 1}, headers={"Authorization": "Basic eDp5"})
    assert_problem(r, 401)


def test_stream_not_granted_is_403_for_the_whole_batch(server):
    body = [{"stream": "mine/1", "data": 1}, {"stream": "theirs/1", "data": 2}]
    r = server.post(EVENTS, json=body, headers=auth(publish=["mine/*"]))
    assert_problem(r, 403, index=1, stream="theirs/1")
    assert_nothing_stored(server)


def test_read_parameters_are_validated(server):
    for params in (
        {},
        {"clientId": "c", "limit": "0"},
        {"clientId": "c", "limit": "x"},
        {"clientId": "c", "after": "abc"},
        {"stream": "bad name"},
    ):
        assert_problem(server.get(EVENTS, params=params, headers=auth()), 400)


def test_unknown_route_and_method_are_problems(server):
    assert_problem(server.get("/api/v1/nothing"), 404)
    r = server.delete(EVENTS, headers=auth())
    assert_problem(r, 405)
    assert "POST" in r.headers["Allow"]
