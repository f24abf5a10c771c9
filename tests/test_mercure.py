"""The Mercure front door against real servers: publish as the Symfony component encodes it,
selectors (exact, URI templates, `*`), private updates, the three token locations, resume by
update id from durable history in another process and after a restart, `earliest`, and bad
input refused with nothing stored or sent."""

from __future__ import annotations

import re
import time
from urllib.parse import quote_plus

import jwt
import pytest

from mercure.selectors import Selectors, compile_template
from mercure.updates import Update
from tests.browser_helper import BrowserHelper, needs_chromium
from tests.helpers import EVENTS, SSE, auth
from tests.sse import Stream

HUB = "/.well-known/mercure"
PUB_KEY = "publisher-key-of-reasonable-length-000000"
SUB_KEY = "subscriber-key-of-reasonable-length-11111"
MERCURE = {"MERCURE_PUBLISHER_JWT_KEY": PUB_KEY, "MERCURE_SUBSCRIBER_JWT_KEY": SUB_KEY}


def mtoken(key: str = PUB_KEY, publish=None, subscribe=None, **claims) -> str:
    mercure = {}
    if publish is not None:
        mercure["publish"] = list(publish)
    if subscribe is not None:
        mercure["subscribe"] = list(subscribe)
    return jwt.encode({"mercure": mercure, **claims}, key, algorithm="HS256")


PUBLISHER = mtoken(publish=["*"])


def symfony_form(fields: dict) -> str:
    """What Symfony's Mercure `Hub::publish` sends: PHP's http_build_query (spaces as `+`,
    arrays as `topic[0]=`), then the `[n]` suffixes removed so `topic` repeats."""
    parts = []
    for name, value in fields.items():
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            key = f"{name}[{i}]" if isinstance(value, list) else name
            parts.append(f"{quote_plus(key)}={quote_plus(v)}")
    return re.sub(r"%5B[0-9]+%5D=", "=", "&".join(parts))


def post(server, body: str, tok: str | None = PUBLISHER, **headers):
    if tok is not None:
        headers.setdefault("Authorization", f"Bearer {tok}")
    headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    return server.post(HUB, data=body.encode(), headers=headers)


def publish(server, topic, data="", **fields) -> str:
    r = post(server, symfony_form({"topic": topic, "data": data, **fields}))
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    return r.text


def subscribe(server, *selectors, tok: str | None = None, headers=None, cookies=None, **params) -> Stream:
    h = dict(headers or {})
    if tok is not None:
        h["Authorization"] = f"Bearer {tok}"
    s = Stream(server.url + HUB, headers=h, params={"topic": list(selectors), **params}, cookies=cookies)
    assert s.response.status_code == 200
    s.next(("retry",))  # the preamble: subscribed from here on
    return s


@pytest.fixture
def hub(make_server, database_url):
    return make_server(database_url, MERCURE_ANONYMOUS="1", **MERCURE)


# -- selectors, without a server ------------------------------------------------------------


@pytest.mark.parametrize(
    "selector, topic, matched",
    [
        ("*", "anything at all", True),
        ("https://ex.net/a", "https://ex.net/a", True),
        ("https://ex.net/a", "https://ex.net/ab", False),
        ("https://ex.net/books/{id}", "https://ex.net/books/42", True),
        ("https://ex.net/books/{id}", "https://ex.net/books/42/pages", False),
        ("https://ex.net/books/{id}", "https://ex.net/authors/42", False),
        ("https://ex.net/{+path}", "https://ex.net/a/b/c", True),
        ("https://ex.net/u{/seg*}", "https://ex.net/u/1/2", True),
        ("https://ex.net/users/foo/{?topic}", "https://ex.net/users/foo/?topic=https%3A%2F%2Fx", True),
        ("https://ex.net/s{?q,lang}", "https://ex.net/s?q=a&lang=fr", True),
        ("https://ex.net/a{#frag}", "https://ex.net/a#top", True),
        ("{x}", "", True),
        ("bad}{", "bad}{", True),  # not a template: only itself
        ("bad}{", "bad}x{", False),
        ("https://ex.net/{}", "https://ex.net/x", False),
        ("https://ex.net/{ bad }", "https://ex.net/x", False),
    ],
)
def test_selector_matching(selector, topic, matched):
    assert Selectors().matches(selector, topic) is matched


def test_only_valid_templates_compile():
    assert compile_template("https://ex.net/{id}") is not None
    assert compile_template("plain") is None  # no expression: equality decides
    assert compile_template("a{b") is None and compile_template("a}b{c}") is None


def test_update_bytes_split_data_lines_as_eventsource_reads_them():
    body = Update("u1", ("t",), "a\r\nb\rc\nd", type="ev", retry=10).sse()
    assert body == b"id: u1\nevent: ev\nretry: 10\ndata: a\ndata: b\ndata: c\ndata: d\n\n"


# -- publish and subscribe -------------------------------------------------------------------


def test_symfony_encoded_update_reaches_a_template_subscriber_with_its_fields(hub):
    s = subscribe(hub, "https://example.com/books/{id}")
    other = subscribe(hub, "https://example.com/authors/{id}")
    data = 'line one & "two"\nline + three = 3%'
    body = symfony_form(
        {
            "topic": ["https://example.com/books/1", "https://example.com/alt/1"],
            "data": data,
            "id": "urn:book:1:v2",
            "type": "book.updated",
            "retry": "2500",
        }
    )
    assert "topic=https" in body and "topic%5B" not in body and "+" in body
    r = post(hub, body)
    assert (r.status_code, r.text) == (200, "urn:book:1:v2")
    assert s.events(1) == [("urn:book:1:v2", "book.updated", data)]
    assert s.parser.retry == 2500
    marker = publish(hub, "https://example.com/authors/7", "marker")
    assert other.events(1)[0][0] == marker  # the book update never reached it
    s.close()
    other.close()


def test_ids_are_generated_and_alternate_topics_match(hub):
    s = subscribe(hub, "alt-topic")
    update_id = publish(hub, ["canonical", "alt-topic"], "x")
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", update_id)
    assert s.events(1) == [(update_id, "message", "x")]
    s.close()


def test_private_updates_reach_only_subscribers_whose_claims_match(hub):
    allowed = subscribe(
        hub, "https://ex.net/doc/{id}", tok=mtoken(SUB_KEY, subscribe=["https://ex.net/users/7/{?topic}"])
    )
    other = subscribe(
        hub, "https://ex.net/doc/{id}", tok=mtoken(SUB_KEY, subscribe=["https://ex.net/users/8/{?topic}"])
    )
    anonymous = subscribe(hub, "*")
    topics = ["https://ex.net/doc/1", "https://ex.net/users/7/?topic=https%3A%2F%2Fex.net%2Fdoc%2F1"]
    secret = publish(hub, topics, "for user 7", private="on")
    public = publish(hub, "https://ex.net/doc/2", "for everyone")
    assert [e[0] for e in allowed.events(2)] == [secret, public]
    assert [e[0] for e in other.events(1)] == [public]
    assert [e[0] for e in anonymous.events(1)] == [public]
    for s in (allowed, other, anonymous):
        s.close()


def test_the_same_id_and_update_again_is_not_sent_twice(hub):
    s = subscribe(hub, "t")
    first = publish(hub, "t", "once", id="fixed-1")
    assert publish(hub, "t", "once", id="fixed-1") == first  # a retry: answered, not re-sent
    marker = publish(hub, "t", "marker")
    assert [e[0] for e in s.events(2)] == [first, marker]
    s.close()


# -- resume from durable history ---------------------------------------------------------------


def test_resume_by_id_in_another_process_and_after_a_restart(make_server, database_url):
    a = make_server(database_url, MERCURE_ANONYMOUS="1", **MERCURE)
    b = make_server(database_url, MERCURE_ANONYMOUS="1", **MERCURE)
    ids = [publish(a, "room", f"m{i}") for i in range(4)]
    publish(a, "elsewhere", "not for the room")
    s = Stream(b.url + HUB, headers={"Last-Event-ID": ids[0]}, params={"topic": "room"})
    assert s.response.headers["Last-Event-ID"] == ids[0]
    assert [(e[0], e[2]) for e in s.events(3)] == [(i, f"m{n + 1}") for n, i in enumerate(ids[1:])]
    live = publish(a, "room", "live")
    assert s.events(1)[0][0] == live  # then live, from the other process
    s.close()
    a.kill()
    a.start()
    resumed = Stream(a.url + HUB, params={"topic": "room", "lastEventID": ids[2]})
    assert resumed.response.headers["Last-Event-ID"] == ids[2]
    assert [e[0] for e in resumed.events(2)] == [ids[3], live]
    resumed.close()


def test_earliest_and_unknown_ids(hub):
    ids = [publish(hub, "e", str(i)) for i in range(3)]
    s = Stream(hub.url + HUB, headers={"Last-Event-ID": "earliest"}, params={"topic": "e"})
    assert s.response.headers["Last-Event-ID"] == "earliest"
    assert [e[0] for e in s.events(3)] == ids
    s.close()
    unknown = Stream(hub.url + HUB, params={"topic": "e", "lastEventID": "no-such-id"})
    assert unknown.response.headers["Last-Event-ID"] == "earliest"  # history before it: lost
    unknown.next(("retry",))
    live = publish(hub, "e", "new")
    assert [e[0] for e in unknown.events(1)] == [live]
    unknown.close()
    plain = subscribe(hub, "e")
    assert "Last-Event-ID" not in plain.response.headers
    plain.close()


def test_the_header_beats_the_query_parameter(hub):
    ids = [publish(hub, "h", str(i)) for i in range(3)]
    s = Stream(hub.url + HUB, headers={"Last-Event-ID": ids[1]}, params={"topic": "h", "lastEventID": ids[0]})
    assert [e[0] for e in s.events(1)] == [ids[2]]
    s.close()


# -- tokens ---------------------------------------------------------------------------------


def test_token_locations_in_the_protocols_order(make_server, database_url):
    hub = make_server(database_url, **MERCURE)  # no anonymous subscribers
    good = mtoken(SUB_KEY, subscribe=["*"])
    assert hub.get(HUB, params={"topic": "t"}).status_code == 401
    for s in (
        subscribe(hub, "t", tok=good),
        subscribe(hub, "t", authorization=good),
        subscribe(hub, "t", cookies={"mercureAuthorization": good}),
    ):
        assert s.response.headers["Content-Type"].startswith("text/event-stream")
        s.close()
    query = Stream(hub.url + HUB, params={"topic": "t", "authorization": good})
    assert "private" in query.response.headers["Cache-Control"]
    query.close()
    # The header wins: a bad header is not rescued by a good cookie.
    r = hub.get(
        HUB,
        params={"topic": "t"},
        headers={"Authorization": "Bearer nope"},
        cookies={"mercureAuthorization": good},
        stream=True,
    )
    assert r.status_code == 401
    assert (
        hub.get(
            HUB, params={"topic": "t", "authorization": mtoken(PUB_KEY, subscribe=["*"])}, stream=True
        ).status_code
        == 401
    )  # signed with the publisher's key
    cookie_pub = hub.post(
        HUB,
        data={"topic": "t", "data": "c"},
        cookies={"mercureAuthorization": PUBLISHER},
        headers={"Origin": hub.url},
    )
    assert cookie_pub.status_code == 200  # a cookie publisher, from the hub's own origin
    cookie_pub = hub.post(HUB, data={"topic": "t", "data": "c"}, cookies={"mercureAuthorization": PUBLISHER})
    assert cookie_pub.status_code == 403  # saying nothing of where it comes from (CSRF)


def test_an_expiring_token_ends_the_stream_and_an_expired_one_is_refused(make_server, database_url):
    hub = make_server(database_url, TOKEN_LEEWAY_S="0", **MERCURE)
    s = subscribe(hub, "t", tok=mtoken(SUB_KEY, exp=int(time.time()) + 2))
    assert s.next(("end",), timeout=10) == ("end",)
    expired = mtoken(SUB_KEY, exp=int(time.time()) - 10)
    r = hub.get(HUB, params={"topic": "t"}, headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401 and "expired" in r.json()["detail"]


# -- refusals: clear status, nothing stored, nothing sent ---------------------------------------

BAD_UPDATES = [
    ("no topic", {"data": "x"}, PUBLISHER, 400),
    ("id with a line break", {"topic": "t", "id": "a\nb"}, PUBLISHER, 400),
    ("id with a CR", {"topic": "t", "id": "a\rb"}, PUBLISHER, 400),
    ("id starting with #", {"topic": "t", "id": "#1"}, PUBLISHER, 400),
    ("type with a line break", {"topic": "t", "type": "a\nb"}, PUBLISHER, 400),
    ("non-integer retry", {"topic": "t", "retry": "soon"}, PUBLISHER, 400),
    ("negative retry", {"topic": "t", "retry": "-5"}, PUBLISHER, 400),
    ("reserved topic", {"topic": "/.well-known/mercure/subscriptions/x"}, PUBLISHER, 400),
    ("reserved absolute topic", {"topic": ["t", "https://h.example/.well-known/mercure"]}, PUBLISHER, 400),
    (
        "claims not covering every topic",
        {"topic": ["https://ex.net/a/1", "https://ex.net/b/1"]},
        mtoken(publish=["https://ex.net/a/{id}"]),
        403,
    ),
    ("no publish claim", {"topic": "t"}, mtoken(subscribe=["*"]), 403),
    ("a subscriber's key", {"topic": "t"}, mtoken(SUB_KEY, publish=["*"]), 401),
    ("no token", {"topic": "t"}, None, 401),
]


@pytest.mark.parametrize("name, fields, tok, status", BAD_UPDATES, ids=[b[0] for b in BAD_UPDATES])
def test_bad_updates_are_refused_with_nothing_stored_or_sent(hub, name, fields, tok, status):
    s = subscribe(hub, "*")
    r = post(hub, symfony_form(fields), tok)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/problem+json"
    marker = publish(hub, "marker", "after")
    assert [e[0] for e in s.events(1)] == [marker]  # the refused update was never sent
    s.close()
    history = Stream(hub.url + HUB, headers={"Last-Event-ID": "earliest"}, params={"topic": "*"})
    assert [e[0] for e in history.events(1)] == [marker]  # ... nor stored
    history.close()


def test_other_bad_requests(hub):
    r = hub.post(
        HUB,
        data=b'{"topic": "t"}',
        headers={"Authorization": f"Bearer {PUBLISHER}", "Content-Type": "application/json"},
    )
    assert r.status_code == 415
    assert hub.get(HUB).status_code == 400  # no topic selector
    many = hub.get(HUB, params={"topic": [f"t{i}" for i in range(60)]})
    assert many.status_code == 400


def test_the_door_is_off_without_a_key_and_apart_from_native_streams(make_server, database_url):
    off = make_server(database_url)
    assert off.get(HUB, params={"topic": "t"}).status_code == 404
    assert post(off, "topic=t&data=x").status_code == 404
    hub = make_server(database_url, **MERCURE)
    native = Stream(hub.url + SSE, headers=auth(), params={"stream": "**"})
    native.next(("retry",))
    publish(hub, "t", "mercure only")
    r = hub.post(EVENTS, json={"stream": "n", "data": 1}, headers=auth())
    first = native.next()
    assert first[1].rpartition(".")[2] == r.json()["events"][0]["id"]  # not the Mercure update
    native.close()
    assert hub.get(EVENTS, params={"stream": ".mercure"}, headers=auth()).status_code == 400


def test_public_key_tokens_verify_with_the_configured_algorithm_only():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from common.problems import Problem
    from mercure.tokens import MercureKey, MercureTokens

    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tokens = MercureTokens(MercureKey(pem.decode(), "ES256"))
    good = jwt.encode({"mercure": {"subscribe": ["a/{x}"]}}, private, algorithm="ES256")
    assert tokens.verify(good).subscribe == ("a/{x}",)
    # The public key as an HS256 secret (algorithm confusion) must not verify.
    forged = jwt.encode({"mercure": {"publish": ["*"]}}, "x" * 32, algorithm="HS256")
    with pytest.raises(Problem) as refused:
        tokens.verify(forged)
    assert refused.value.status == 401
    with pytest.raises(ValueError):
        MercureKey(pem.decode(), "RS256")  # an EC key is not an RSA key


def test_browsers_sharing_a_token_and_address_are_paced_never_refused(make_server, database_url):
    hub = make_server(
        database_url,
        MAX_RECONNECTS="2",
        RETRY_BASE_MS="100",
        RETRY_MAX_MS="5000",
        MERCURE_ANONYMOUS="1",
        **MERCURE,
    )
    first = publish(hub, "p", "x")
    fresh = []
    for _ in range(5):  # new subscribers: admitted, with the base retry
        s = Stream(hub.url + HUB, params={"topic": "p"})
        assert s.response.status_code == 200
        fresh.append(s.next(("retry",))[1])
        s.close()
    assert fresh == [100] * 5
    resumed = []
    for _ in range(8):  # reconnects (they resume): far past MAX_RECONNECTS, still admitted
        s = Stream(hub.url + HUB, headers={"Last-Event-ID": first}, params={"topic": "p"})
        assert s.response.status_code == 200
        resumed.append(s.next(("retry",))[1])
        s.close()
    assert max(resumed[-3:]) > 200 and max(resumed) <= 5000  # the retry grows, within bounds


def test_heartbeats_and_the_fleet_connection_limit_apply(make_server, database_url):
    hub = make_server(database_url, HEARTBEAT_S="0.3", MAX_CONNECTIONS_PER_TOKEN="1", **MERCURE)
    tok = mtoken(SUB_KEY, subscribe=["*"])
    s = subscribe(hub, "quiet", tok=tok)
    assert s.next(("comment",), timeout=10) == ("comment",)  # `:` after HEARTBEAT_S of silence
    second = hub.get(HUB, params={"topic": "quiet"}, headers={"Authorization": f"Bearer {tok}"})
    assert second.status_code == 429  # refused before the first byte
    assert second.headers["Content-Type"] == "application/problem+json"
    s.close()


@needs_chromium[0]
@needs_chromium[1]
def test_chromium_eventsource_with_the_cookie_gets_private_updates_and_resumes_by_id(
    make_server, database_url
):
    hub = make_server(database_url, RETRY_BASE_MS="300", RETRY_MAX_MS="1000", **MERCURE)
    mine = mtoken(SUB_KEY, subscribe=["https://example.com/users/7/{?topic}"])
    other = mtoken(SUB_KEY, subscribe=["https://example.com/users/8/{?topic}"])
    page = BrowserHelper("mercure.py", hub.url, mine, other)
    assert page.read()["step"] == "open"
    private_topics = [
        "https://example.com/doc/1",
        "https://example.com/users/7/?topic=https%3A%2F%2Fexample.com%2Fdoc%2F1",
    ]
    public = publish(hub, "https://example.com/doc/2", "for everyone", id="pub-1")
    secret = publish(hub, private_topics, "for user 7", private="on", type="doc.updated", id="priv-1")
    page.tell("published")
    before = page.read()
    assert before["step"] == "before-restart"
    assert before["seen"]["cookie"] == [
        {"id": public, "type": "message", "data": "for everyone"},
        {"id": secret, "type": "doc.updated", "data": "for user 7"},
    ]
    assert before["seen"]["other"] == [{"id": public, "type": "message", "data": "for everyone"}]
    hub.stop()
    hub.start()
    later = [publish(hub, "https://example.com/doc/3", f"after {n}", id=f"after-{n}") for n in range(2)]
    page.tell("restarted")
    done = page.read(timeout=60)
    assert done["step"] == "done" and done["opens"]["cookie"] >= 2
    # The browser resumed from the last id it had (Last-Event-ID: priv-1): nothing missed,
    # nothing twice.
    assert [e["id"] for e in done["seen"]["cookie"]] == [public, secret, *later]
    page.finish()
