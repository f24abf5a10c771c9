"""The Python SDK (`pip install ./clients/python`, installed by requirements-dev.txt) against
real Sluice servers: tokens it mints are accepted, publishing retries safely and honours
Retry-After, history pages, webhook signatures check out, and a subscription resumes from its
last id across a server restart."""

from __future__ import annotations

import json
import threading
import time

import gevent
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from gevent.pywsgi import WSGIServer
from sluice_client import (
    Client,
    SluiceError,
    SSEParser,
    mint_mercure_token,
    mint_token,
    signature,
    verify_webhook,
    webhook_secret,
)

from config.settings import derived_webhook_secret
from tests.helpers import EVENTS, SECRET, wait_until


def client(server, tok: str | None = None, **kw) -> Client:
    return Client(server.url, tok or mint_token(SECRET, "sdk-1", publish=["**"], subscribe=["**"]), **kw)


def stored(server, stream):
    return list(client(server).iter_history(stream=stream))


# -- tokens ---------------------------------------------------------------------------------


def _pems(private):
    return (
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    )


def test_minted_tokens_are_accepted_in_every_algorithm(make_server, database_url):
    rsa_private, rsa_public = _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec_private, ec_public = _pems(ec.generate_private_key(ec.SECP256R1()))
    server = make_server(database_url, SLUICE_PUBLIC_KEYS=json.dumps({"rs": rsa_public, "es": ec_public}))
    for key, alg, kid in ((SECRET, "HS256", None), (rsa_private, "RS256", "rs"), (ec_private, "ES256", "es")):
        tok = mint_token(key, f"origin-{alg}", publish=["orders/*"], algorithm=alg, kid=kid)
        result = client(server, tok).publish("orders/1", {"alg": alg})
        assert not result.duplicate
    denied = mint_token(SECRET, "origin", publish=["orders/*"])
    with pytest.raises(SluiceError) as refused:
        client(server, denied).publish("invoices/1", {})
    assert refused.value.status == 403
    with pytest.raises(ValueError):
        mint_token(SECRET, "x", algorithm="none")
    assert [e.data for e in stored(server, "orders/1")] == [
        {"alg": "HS256"},
        {"alg": "RS256"},
        {"alg": "ES256"},
    ]


def test_a_mercure_token_publishes_on_the_mercure_door(make_server, database_url):
    key = "mercure-key-of-reasonable-length-0000000"
    server = make_server(database_url, MERCURE_PUBLISHER_JWT_KEY=key)
    tok = mint_mercure_token(key, publish=["https://ex.net/{id}"])
    r = server.post(
        "/.well-known/mercure",
        data={"topic": "https://ex.net/1", "data": "x"},
        headers={"Authorization": f"Bearer {tok}"},
    )
    assert r.status_code == 200 and r.text.startswith("urn:uuid:")


# -- publishing -----------------------------------------------------------------------------


def test_keys_make_publishing_safe_to_repeat(server):
    c = client(server)
    first = c.publish("s", {"n": 1}, key="order-1")
    again = c.publish("s", {"n": 1}, key="order-1")
    assert (again.id, again.duplicate, first.duplicate) == (first.id, True, False)
    many = c.publish_many([{"stream": "s", "data": i} for i in range(1500)])  # two requests
    assert len(many) == 1500 and len({p.key for p in many}) == 1500
    assert len(stored(server, "s")) == 1501


def test_publishing_waits_out_an_outage_honouring_retry_after(make_server, own_postgres):
    server = make_server(
        own_postgres.url, DB_CONNECT_TIMEOUT_S="1", DB_POOL_TIMEOUT_S="1", INGEST_COMMIT_TIMEOUT_S="2"
    )
    own_postgres.stop()
    probe = requests.post(
        server.url + EVENTS,
        json={"stream": "s", "data": 0},
        headers={"Authorization": f"Bearer {mint_token(SECRET, 'p', publish=['**'])}"},
        timeout=15,
    )
    assert probe.status_code == 503
    told = float(probe.headers["Retry-After"])
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:
            own_postgres.start()  # the outage ends while the client waits
        time.sleep(seconds)

    c = client(server, sleep=sleep, retries=8)
    result = c.publish("s", "survived", key="k-1")
    assert waits and waits[0] == told  # the server's Retry-After, not a guess
    assert [(e.key, e.data) for e in stored(server, "s")] == [("k-1", "survived")]
    assert c.publish("s", "survived", key="k-1").id == result.id  # and a retry stays one event


def test_refusals_raise_with_the_problem(server):
    with pytest.raises(SluiceError) as bad:
        client(server).publish("bad stream name!", 1)
    assert bad.value.status == 400 and bad.value.problem["status"] == 400
    with pytest.raises(SluiceError) as unauthorized:
        Client(server.url, "not-a-token").publish("s", 1)
    assert unauthorized.value.status == 401


# -- history --------------------------------------------------------------------------------


def test_history_pages_and_iterates(server):
    c = client(server)
    ids = [p.id for p in c.publish_many([{"stream": "h", "data": i, "type": "tick"} for i in range(7)])]
    page = c.history(stream="h", limit=3)
    assert [e.id for e in page.events] == ids[:3] and page.next == ids[2]
    assert [e.id for e in c.iter_history(stream="h", limit=3)] == ids
    assert [e.data for e in c.iter_history(stream="h", after=ids[4])] == [5, 6]
    assert {e.type for e in c.iter_history(client_id="sdk-1")} == {"tick"}


# -- webhooks -------------------------------------------------------------------------------


def test_webhook_signatures(make_server, database_url):
    received: list[tuple[bytes, str]] = []

    def app(environ, start_response):
        received.append((environ["wsgi.input"].read(), environ.get("HTTP_SLUICE_SIGNATURE", "")))
        start_response("204 No Content", [])
        return [b""]

    origin = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    origin.start()
    try:
        server = make_server(
            database_url,
            WEBHOOK_GRACE_S="0",
            SLUICE_WEBHOOK_URL=f"http://127.0.0.1:{origin.server_port}/hook",
        )
        client(server).publish("room", "x")
        s = client(server).subscribe("room")
        reader = gevent.spawn(lambda: next(s, None))
        wait_until(lambda: received, 15, message="a subscribe notice")
        reader.kill()
        s.close()
    finally:
        origin.stop(timeout=1)
    body, header = received[0]
    assert json.loads(body)["notices"][0]["event"] == "subscribe"
    secret = webhook_secret(SECRET)  # SLUICE_WEBHOOK_SECRET is unset: derived from SLUICE_SECRET
    assert secret == derived_webhook_secret(SECRET)  # the SDK and the server agree
    assert verify_webhook(secret, body, header)
    assert not verify_webhook(SECRET, body, header)  # never the token key
    assert not verify_webhook(secret, body + b" ", header)  # tampered body
    assert not verify_webhook("other-secret", body, header)  # wrong secret
    assert not verify_webhook(secret, body, header, now=time.time() + 3600)  # replayed late
    assert not verify_webhook(secret, body, None)
    assert not verify_webhook(secret, body, "t=abc,v1=00")
    assert verify_webhook("s", b"b", signature("s", b"b", 1000), now=1100, tolerance_s=300)


# -- subscribing ----------------------------------------------------------------------------


def test_a_subscription_resumes_after_a_restart_without_gaps_or_repeats(make_server, database_url):
    server = make_server(database_url, RETRY_BASE_MS="200", RETRY_MAX_MS="500")
    c = client(server)
    c.publish("live", "before")
    sub = c.subscribe("live", read_timeout_s=10)
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(e.value for e in sub), daemon=True)
    reader.start()
    gevent.sleep(0.5)
    c.publish_many([{"stream": "live", "data": i} for i in range(3)])
    wait_until(lambda: len(got) == 3, 15, message="the first three")
    server.stop()
    server.start()
    c.publish_many([{"stream": "live", "data": i} for i in range(3, 6)])  # while it was away
    wait_until(lambda: len(got) == 6, 30, message="the rest after the restart")
    assert got == [0, 1, 2, 3, 4, 5]
    assert sub.reconnects >= 1
    sub.close()


def test_a_refused_subscription_raises_and_a_deleted_stream_ends(server):
    c = client(server)
    with pytest.raises(SluiceError) as missing:
        next(iter(c.subscribe("no-such-stream")))
    assert missing.value.status == 404
    c.publish("doomed", 1)
    sub = c.subscribe("doomed", last_event_id="0")
    assert next(sub).value == 1
    server.delete(
        "/api/v1/streams/doomed",
        headers={"Authorization": f"Bearer {mint_token(SECRET, 'a', publish=['**'])}"},
    )
    assert list(sub) == []  # `event: end`: the iteration stops
    assert sub.closed


# -- the parser ------------------------------------------------------------------------------


def test_the_parser_follows_the_event_stream_rules():
    p = SSEParser()
    stream = (
        b"\xef\xbb\xbfretry: 1500\r\nid: a.1\r\n\r\n: comment\r\nevent: chat\r\n"
        b"data:  two spaces\r\ndata: second\r\rid: bad\x00id\ndata\n\nretry: x\n"
        b"data: caf\xc3\xa9\n\n"
    )
    events = []
    for i in range(len(stream)):  # one byte at a time: CRLF and UTF-8 split across reads
        events += p.feed(stream[i : i + 1])
    assert [(e.id, e.type, e.data) for e in events] == [
        ("a.1", "chat", " two spaces\nsecond"),
        ("a.1", "message", ""),
        ("a.1", "message", "café"),
    ]
    assert p.retry_ms == 1500 and p.last_event_id == "a.1"
    assert events[0].position == "1"
